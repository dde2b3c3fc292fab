#!/usr/bin/env bash
# The commands of notebooks/kaggle.ipynb, one step per cell (docs/kaggle.md), run from the clone's root:
#   bash notebooks/kaggle.sh install   install into Kaggle's own Python, keeping its torch (make install PYTHON=...)
#   bash notebooks/kaggle.sh setup     DVC's cache linked instead of copied (20 GB of /kaggle/working), the profile
#   bash notebooks/kaggle.sh resume    after a restored previous output ($PREVIOUS): relink it, relink the data
#   bash notebooks/kaggle.sh train     every member on the two T4s, then the ensemble; stops before the session does
#   bash notebooks/kaggle.sh submit    make submit; the notebook's cell hands it the API token in its environment
# Settings from the environment: PROFILE (competition), JOBS (2: one member per T4), TRAIN_HOURS (11: Kaggle ends a
# session at 12 hours; the last hour saves the output), PREVIOUS (the restored output, for `resume`).
set -euo pipefail
cd "$(dirname "$0")/.."
# Every make target runs in the notebook's own Python: without PYTHON=... make would use the project's .venv.
python_make() { make PYTHON="$(command -v python)" "$@"; }

case "${1:-}" in
  install)
    python_make install
    ;;
  setup)
    # Hard links from the workspace into DVC's cache instead of copies: a cached output then takes its size once.
    dvc config --local cache.type reflink,hardlink,symlink
    python_make profile PROFILE="${PROFILE:-competition}"
    ;;
  resume)
    if [ -z "${PREVIOUS:-}" ]; then echo ">> a fresh run: nothing to resume"; exit 0; fi
    echo ">> resuming the run saved in $PREVIOUS: finished stages come from DVC's cache, the member in training"
    echo ">> from its last epoch's checkpoint (models/checkpoints/)"
    # --allow-missing: the stages a cut-short session never ran keep dvc.lock entries whose outputs were never cached
    dvc checkout --relink --allow-missing
    # data/paddy's image folders are links into the competition's mount, which a saved output may not keep: relink
    # them (verified again; the same SOURCE.json, so nothing downstream reruns).
    dvc repro --force --single-item paddy_data
    ;;
  train)
    status=0
    timeout --kill-after=10m "${TRAIN_HOURS:-11}h" make PYTHON="$(command -v python)" train-parallel JOBS="${JOBS:-2}" \
      || status=$?
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then  # timeout: TERM, then KILL after 10 minutes
      echo ">> ${TRAIN_HOURS:-11} hours are up: save this version (its output is the run so far); to go on, attach it"
      echo ">> to a new session as PREVIOUS and run the notebook again (docs/kaggle.md 'Longer than a session')"
      exit 0
    fi
    exit "$status"
    ;;
  submit)
    python_make submit
    ;;
  *)
    echo "usage: bash notebooks/kaggle.sh install|setup|resume|train|submit (docs/kaggle.md)" >&2
    exit 2
    ;;
esac
