"""Hostile inputs through `spinegrade serve` (#25 item 1): the corpus of :mod:`hostile_corpus` sent
to a real Orthanc, beside one good phantom study, and graded by the service's loop.

Every file of a kind is POSTed to a private Orthanc (LocalOrthanc, loopback, basic auth) as a
modality would send it; what Orthanc refuses at upload (zero-byte and text files, a DICOMDIR, a
damaged header ...) is counted: that is the PACS doing its job, not ours. 46 of the 54 kinds are
sent. Left out: the two ``big`` kinds (two 4,096 x 4,096 slices, 2,000 slices; test_hostile.py
reads them for its memory checks, here they would add minutes of upload and retrieval) and the
six kinds about the file system around the files (a link loop, a dangling link, a named pipe,
chmod 000, a file rewritten while read, an empty sub-folder): none of that travels through DICOM,
so on the PACS they are plain good series, and each graded study costs ~2 s here. The loop then
polls until nothing is pending, and Orthanc's REST API, the state and the worklist are asked what
became of each study: the good one holds one SR and one SC; every other one is graded (with its
warnings) or failed with one clear line that says what is wrong; nothing is graded twice; the
loop never raised.
"""

from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

pytest.importorskip("highdicom", reason="pip install 'spinegrade[serve]' for the service tests")
pytest.importorskip("dicomweb_client", reason="pip install 'spinegrade[serve]'")

from hostile_corpus import KINDS, Kind, tree_digest, uid, write_corpus
from serve_helpers import TOKEN, instances_in_orthanc, page_server, study_uid_of
from spinegrade.serve.orthanc import LocalOrthanc, orthanc_missing

FILE_SYSTEM = {"symlink_loop", "broken_link", "fifo", "unreadable", "changing", "empty_subfolder"}
SENT = [k for k in KINDS if not k.big and k.name not in FILE_SYSTEM]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Culprits the service never reads: not MR (a screenshot, a CT slice), so never retrieved.
NOT_MR = {"rgb_secondary_capture", "ct_stray"}
# A Python exception as a reason ("ZeroDivisionError: float division by zero"): the worklist
# must say what is wrong with the study, not which exception a library raised.
EXCEPTION_NAME = re.compile(r"\b[A-Z]\w*(Error|Exception|Warning|Interrupt)\b")


@dataclass
class Sent:
    """What the upload and the loop made of the corpus."""

    work: Path
    corpus: Path
    good: str  # the phantom study's UID
    study_of: dict[str, list[str]]  # kind -> its study UIDs (two for two_studies)
    accepted: dict[str, list[str]] = field(default_factory=dict)  # kind -> files Orthanc stored
    refused: dict[str, list[str]] = field(default_factory=dict)  # kind -> "file: HTTP status"
    on_pacs: set[str] = field(default_factory=set)  # study UIDs with MR instances in Orthanc
    ot_sent: dict[str, int] = field(default_factory=dict)  # OT instances sent (a screenshot)
    rounds: int = 0
    crashes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    unchanged: bool = False


def post_file(server: LocalOrthanc, path: Path) -> int:
    """POST one file to Orthanc's REST API as a modality's export would; the HTTP status."""
    r = requests.post(f"{server.url}/instances", data=path.read_bytes(), auth=server.auth,
                      timeout=60)  # fmt: skip
    return r.status_code


def send_kind(server: LocalOrthanc, folder: Path, sent: Sent, kind: Kind) -> None:
    """Every file of a kind's folder, one POST each; Orthanc's answer per file."""
    accepted, refused = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        code = post_file(server, path)
        (accepted if code == 200 else refused).append(rel if code == 200 else f"{rel}: {code}")
    sent.accepted[kind.name], sent.refused[kind.name] = accepted, refused


@pytest.fixture(scope="module")
def sent(tiny_trained, tmp_path_factory):
    """The corpus and a good study on a fresh Orthanc, the loop run until nothing is pending."""
    from spinegrade.serve.service import Service, load_serve_config

    missing = orthanc_missing()
    if missing:
        pytest.skip(missing)
    data, run = tiny_trained
    base = tmp_path_factory.mktemp("serve_hostile")
    corpus = base / "corpus"
    folders = write_corpus(corpus, SENT)
    before = tree_digest(corpus)
    good = sorted((data / "test_images").iterdir())[0]
    study_of = {k.name: [uid("study", k.name)] for k in SENT}
    study_of["two_studies"].append(uid(uid("study", "two_studies"), "other study"))
    with LocalOrthanc(base / "orthanc") as server:
        out = Sent(base / "work", corpus, study_uid_of(good), study_of)
        t0 = time.perf_counter()
        server.upload_folder(good)
        for kind in SENT:
            send_kind(server, folders[kind.name], out, kind)
        out.on_pacs = {
            u for uids in [*study_of.values(), [out.good]] for u in uids
            if instances_in_orthanc(server, u, "MR")
        }  # fmt: skip
        out.ot_sent = {u: len(instances_in_orthanc(server, u, "OT")) for u in out.on_pacs}
        cfg = load_serve_config(
            pacs_url=server.dicomweb_url, pacs_user=server.user, pacs_password=server.password,
            token=TOKEN, work_dir=str(out.work), device="cpu", backoff_s=3600.0,
        )  # fmt: skip
        svc = Service(run, cfg)
        model = svc.model.model_id
        for out.rounds in range(1, 200):  # Orthanc calls a study stable 1 s after its last file
            try:
                svc.poll_once()
            except Exception as exc:  # the loop must return: any raise is a crash of the service
                out.crashes.append(f"{type(exc).__name__}: {exc}")
            rows = {r.study_uid: r for r in svc.state.all(model)}
            if out.on_pacs <= rows.keys() and all(
                r.status in ("graded", "failed") for r in rows.values()
            ):
                break
            time.sleep(0.5)
        # One more round: nothing is graded again, and no failure is retried before its backoff.
        again = svc.poll_once()
        out.seconds = time.perf_counter() - t0
        out.unchanged = tree_digest(corpus) == before
        with page_server(svc) as url:
            api = requests.get(f"{url}/api/studies", headers=AUTH, timeout=30).json()
            page = requests.get(f"{url}/", headers=AUTH, timeout=30).text
        yield out, svc, server, again, api, page


def kind_rows(sent: Sent, svc, kind: Kind) -> list:
    return [r for u in sent.study_of[kind.name] if (r := svc.state.get(u, svc.model.model_id))]


def unclear(reason: str, work: Path) -> list[str]:
    """What makes a failure reason unfit for the worklist (empty when it is one clear line)."""
    problems = []
    if not reason.strip() or len(reason) < 20:
        problems.append("empty or too short")
    if "\n" in reason or "Traceback" in reason:
        problems.append("more than one line / a traceback")
    if EXCEPTION_NAME.search(reason):
        problems.append("an exception's name")
    if str(work) in reason or str(work.parent) in reason or re.search(r"(^|\s)/tmp/", reason):
        problems.append("an absolute path of the work folder")
    return problems


# ------------------------------------------------------------------------------- the batch


def test_the_loop_never_raised_and_drained_the_queue(sent) -> None:
    out, svc, _, again, _, _ = sent
    assert out.crashes == []
    rows = {r.study_uid: r for r in svc.state.all(svc.model.model_id)}
    assert out.on_pacs <= rows.keys(), out.on_pacs - rows.keys()
    assert {r.status for r in rows.values()} <= {"graded", "failed"}
    assert again == {"seen": again["seen"], "graded": 0, "failed": 0}
    assert out.unchanged  # the service never writes to what was sent, nor does sending


def test_orthanc_refuses_non_dicom_and_accepts_most_kinds(sent) -> None:
    out = sent[0]
    refused = {f.split(":")[0] for name in ("zero_byte", "text_dcm")
               for f in out.refused[name]}  # fmt: skip
    assert refused == {"empty.dcm", "notes.dcm"}
    # The kinds' other files are fine images: every kind but a lone DICOMDIR reaches Orthanc.
    reached = [k for k in SENT if out.accepted[k.name]]
    assert len(reached) >= 0.8 * len(SENT), [k.name for k in SENT if not out.accepted[k.name]]
    assert not out.accepted["lone_dicomdir"]


def test_the_good_study_holds_one_sr_and_one_sc(sent) -> None:
    out, svc, server, _, _, _ = sent
    row = svc.state.get(out.good, svc.model.model_id)
    assert row.status == "graded", row.reason
    assert instances_in_orthanc(server, out.good, "SR") == [row.sr_sop_uid]
    assert len(instances_in_orthanc(server, out.good, "OT")) == 1
    assert {t["source"] for t in row.result["targets"].values()} == {"model"}


def test_no_study_is_graded_twice(sent) -> None:
    out, svc, server, _, _, _ = sent
    for study in out.on_pacs:
        row = svc.state.get(study, svc.model.model_id)
        graded = [a for a in svc.state.attempts(study) if a["outcome"] == "graded"]
        assert len(graded) == (row.status == "graded"), study
        sr = instances_in_orthanc(server, study, "SR")
        assert sr == ([row.sr_sop_uid] if row.status == "graded" else []), study


# ---------------------------------------------------------------------------- kind by kind


@pytest.mark.parametrize("kind", SENT, ids=[k.name for k in SENT])
def test_each_kind_is_graded_or_fails_with_one_clear_line(sent, kind: Kind) -> None:
    out, svc, server, _, _, _ = sent
    rows = kind_rows(out, svc, kind)
    on_pacs = [u for u in out.study_of[kind.name] if u in out.on_pacs]
    assert len(rows) == len(on_pacs), kind  # every study Orthanc holds reached the worklist
    for row in rows:
        if row.status == "graded":
            assert isinstance(row.result["warnings"], list)
            ot = instances_in_orthanc(server, row.study_uid, "OT")
            assert len(ot) == out.ot_sent[row.study_uid] + 1  # our SC beside what was sent
            assert any(t["source"] == "model" for t in row.result["targets"].values())
            if (
                kind.predict_expect
                and kind.name not in NOT_MR
                and (not kind.culprit or kind.culprit in out.accepted[kind.name])
            ):  # what is wrong reached the service: a warning says it (no slice lost unsaid)
                warned = row.result["warnings"]
                assert any(re.search(kind.predict_expect, w) for w in warned), warned
            continue
        assert row.status == "failed" and row.attempts == 1
        assert unclear(row.reason, out.work) == [], row.reason
        assert len(instances_in_orthanc(server, row.study_uid, "OT")) == out.ot_sent[row.study_uid]
        if kind.series_refused:  # the reader refuses the whole series: the reason says why
            assert re.search(kind.expect, row.reason), row.reason


def test_the_worklist_lists_each_failed_study_with_its_reason_escaped(sent) -> None:
    _, svc, _, _, api, page = sent
    failed = [r for r in svc.state.all(svc.model.model_id) if r.status == "failed"]
    assert failed, "the corpus holds series the reader refuses: some studies must fail"
    listed = {s["study_uid"]: s for s in api}
    for row in failed:
        assert listed[row.study_uid]["status"] == "failed"
        assert listed[row.study_uid]["reason"] == row.reason
        assert f"<td>{html.escape(row.reason)} (retry after" in page, row.reason  # all of it
    assert "<script" not in page.lower()


def test_summary(sent) -> None:
    """The figures BENCHMARKS.md quotes (``pytest -s`` shows them)."""
    out, svc, _, _, _, _ = sent
    rows = [svc.state.get(u, svc.model.model_id) for u in out.on_pacs if u != out.good]
    refused_kinds = [k.name for k in SENT if out.refused[k.name]]
    print(
        f"\nserve hostile: {len(SENT)} kinds sent; Orthanc refused files of {len(refused_kinds)} "
        f"kinds ({', '.join(refused_kinds)}); {len(rows)} studies on the PACS beside the good "
        f"one: {sum(r.status == 'graded' for r in rows)} graded, "
        f"{sum(r.status == 'failed' for r in rows)} failed; crashes {len(out.crashes)}; "
        f"{out.rounds} poll rounds, {out.seconds:.0f} s from upload to drained"
    )
    for r in sorted(rows, key=lambda r: r.status):
        kind = next(k for k, uids in out.study_of.items() if r.study_uid in uids)
        print(f"  {kind}: {r.status} {r.reason or len(r.result['warnings'])}")
    assert len(rows) + 1 == len(out.on_pacs)
