"""Running OctopusNet on Ray: cluster set-up, the epoch loop, reports and the API."""

import os

# Arms log progress lines that differ only in their numbers, which Ray's log
# deduplication would fold into one. Ray reads this when it is first imported.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# Scripts that join a running local cluster (deploy/kill_arm.py, deploy/chaos.py)
# must present the token Ray saved when token authentication is on.
if os.path.isfile(os.path.expanduser("~/.ray/auth_token")):
    os.environ.setdefault("RAY_AUTH_MODE", "token")
