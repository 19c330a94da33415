"""Config overrides for a tiny but complete run (2 folds, one epoch, tiny models): the tests that
train end to end check plumbing, not accuracy."""

TINY_RUN: list[str] = [
    "crops.size=32", "crops.slices=3", "model.backbone=test_efficientnet", "model.dim=32",
    "model.depth=1", "model.heads=2", "model.token_grid=1", "train.batch_size=10",
    "train.epochs=1", "localizer.image_size=64", "localizer.epochs=1",
    "localizer.decoder_channels=8", "localizer.batch_size=4", "data.n_folds=2",
    "data.cache_size=96",
    # An untrained whole look votes noise: the tests that grade "in full" need the chain the
    # zoomed look names alone (the vote has its own tests, test_localize).
    "localizer.vote_mm=0.0",
]  # fmt: skip
