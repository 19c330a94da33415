"""The ground floor: what every stage uses and no stage owns.

- :mod:`.atomic`: the one atomic writer for every marker and output (and the crash points the
  fault tests use);
- :mod:`.parallel`: process pools that stop cleanly;
- :mod:`.progress`: the one progress bar;
- :mod:`.runtime`: where tensors live and how processes cooperate (device, threads, DDP).

Imports nothing of spinegrade but :mod:`spinegrade.config` (the runtime reads the train config).
"""
