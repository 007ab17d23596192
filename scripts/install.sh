#!/usr/bin/env bash
# Create .venv and install clipmed with its test tools. torch comes first and pinned here only:
# a bare `torch` requirement resolved by pip would pull a newer multi-GB build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -e '.[test]'
