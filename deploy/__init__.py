"""Running OctopusNet on Ray: cluster set-up, the epoch loop, reports and the API."""

import os

# Arms log progress lines that differ only in their numbers, which Ray's log
# deduplication would fold into one. Ray reads this when it is first imported.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# Token authentication, Ray's default for a new local cluster, also for the scripts
# that join one by its address (deploy/kill_arm.py, deploy/chaos.py): Ray turns it
# on for those only when told. Set RAY_AUTH_MODE=disabled for a cluster without it.
os.environ.setdefault("RAY_AUTH_MODE", "token")
