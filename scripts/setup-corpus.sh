#!/usr/bin/env bash
# Install the real long documents the benchmarks and the main job read (Debian packages):
#   vim-runtime  - the Vim user manual (Vim license)
#   jargon-text  - the Jargon File (public domain)
#   python3.11-doc - the Python documentation sources (PSF license), draft training text
set -euo pipefail
if ls /usr/share/vim/vim*/doc/usr_01.txt >/dev/null 2>&1 && [ -f /usr/share/doc/jargon-text/jargon.txt.gz ] && ls -d /usr/share/doc/python3*/html/_sources >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends vim-runtime jargon-text python3.11-doc >/dev/null \
  || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends vim-runtime jargon-text python3.11-doc >/dev/null; }
