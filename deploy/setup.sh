#!/usr/bin/env bash
# Set up a Debian 12 host for Phyllome: Debian packages, the Python venv, libvirt daemons.
# Idempotent and quiet when there is nothing to do. Used by `make up` and `make test`.
#   deploy/setup.sh packages   install the Debian packages that are missing (root)
#   deploy/setup.sh venv       create .venv and install the pinned project when pyproject changed
#   deploy/setup.sh kvm        give /dev/kvm group kvm, mode 0660 (udev's rule), if it exists
#   deploy/setup.sh libvirt    the kvm step, then start virtlogd + libvirtd unless systemd does
#   deploy/setup.sh tiny       build the phyllome-tiny guest into the built-in image folder
#   deploy/setup.sh debian     build the phyllome-debian guest there (minutes; `phyllome up
#                              --build-debian`, as `make up` runs it, does it in the background)
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  libvirt-daemon-system libvirt-dev pkg-config gcc python3-venv python3-dev
  qemu-system-x86 qemu-utils ovmf swtpm swtpm-tools osinfo-db hwdata pciutils
  prometheus xfsprogs cpio busybox-static mtools gdisk dosfstools libxml2-utils
  socat rsync curl iproute2 kmod gzip openssl gpgv gnupg dnsmasq-base
  novnc chromium chromium-driver
  grub-common grub-efi-amd64-bin xorriso
  qemu-system-arm qemu-efi-aarch64
  mmdebstrap e2fsprogs openssh-client
)

packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  # The tiny guest's build downloads Debian's kernel: the package lists must be there.
  if [ ${#missing[@]} -eq 0 ]; then
    apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt-get update -qq
    return 0
  fi
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts prometheus as a service on install; Phyllome runs its own when asked.
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
}

venv() {
  local py=${PYTHON:-python3}
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  # compat: the .pth names the checkout; the default finder costs every process (the CLI,
  # each agent) 10-20 ms of imports at start-up (docs/benchmarks.md, CLI start-up).
  local stamp=.venv/.phyllome-installed-compat
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing the Python project into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' \
      --config-settings editable_mode=compat 2>&1 \
      | { grep -v '^WARNING: Location' || true; }
    touch "$stamp"
  fi
}

# What Debian's udev rule does for /dev/kvm (group kvm, 0660). Without udevd (a container, a
# minimal VM) the node stays root-only 0600; libvirt then finds its QEMU capabilities stale
# on every call and re-probes QEMU for seconds each time (50-110 s per define); the vm agent
# reports it in `phyllome status`.
kvm() {
  [ -c /dev/kvm ] || return 0
  getent group kvm >/dev/null || groupadd --system kvm
  chgrp kvm /dev/kvm
  chmod 0660 /dev/kvm
}

libvirt() {
  kvm
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl is-active -q libvirtd || systemctl start libvirtd
    return 0
  fi
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
  # libvirtd creates its socket shortly after forking.
  for _ in $(seq 1 100); do
    [ -S /run/libvirt/libvirt-sock ] && return 0
    sleep 0.1
  done
  echo "libvirtd did not create /run/libvirt/libvirt-sock" >&2
  return 1
}

# The x86_64 build in phyllome-tiny/, the aarch64 one in phyllome-tiny/aarch64/ (one
# catalogue entry with an image per arch); the aarch64 one only where QEMU can run it.
tiny() {
  local dir="${PHYLLOME_STATE_DIR:-/var/lib/phyllome}/images/builtin/phyllome-tiny"
  tiny_build "$dir"
  command -v qemu-system-aarch64 >/dev/null || return 0
  tiny_build "$dir/aarch64" --arch aarch64
}

tiny_build() {
  local dir=$1
  shift
  [ -f "$dir/manifest.json" ] && [ "$dir/manifest.json" -nt deploy/images/tiny/init ] &&
    [ "$dir/manifest.json" -nt deploy/images/build-tiny.sh ] && return 0
  echo "building the phyllome-tiny guest image${*:+ ($*)} into $dir"
  local log
  log=$(mktemp)
  deploy/images/build-tiny.sh "$@" "$dir" >"$log" 2>&1 || { cat "$log" >&2; rm -f "$log"; return 1; }
  rm -f "$log"
}

# The inputs of the phyllome-debian build: its script and files, and apt's candidate version
# of each listed package (tests/support/debian.py hashes the same).
debian_inputs() {
  local f
  for f in deploy/images/build-debian.sh $(find deploy/images/debian -type f | LC_ALL=C sort); do
    printf '%s\0' "${f#deploy/images/}"
    cat "$f"
    printf '\0'
  done
  apt-cache show --no-all-versions $(grep -v '^#' deploy/images/debian/packages) 2>/dev/null |
    awk '/^Package: / {p=$2} /^Version: / {print p "=" $2}' | LC_ALL=C sort
}

debian() {
  local dir="${PHYLLOME_STATE_DIR:-/var/lib/phyllome}/images/builtin/phyllome-debian"
  local cache="${PHYLLOME_STATE_DIR:-/var/lib/phyllome}/images/debs-debian"
  local digest
  digest=$(debian_inputs | sha256sum | cut -d' ' -f1)
  if [ -f "$dir/manifest.json" ] && [ "$(cat "$dir/inputs.sha256" 2>/dev/null)" = "$digest" ]; then
    return 0
  fi
  echo "building the phyllome-debian guest image into $dir"
  # Built beside builtin/ (the catalogue lists every folder there with a disk.raw), then moved.
  local new="${PHYLLOME_STATE_DIR:-/var/lib/phyllome}/images/.phyllome-debian.new-$$"
  mkdir -p "$(dirname "$dir")"
  rm -rf "$new"
  PHYLLOME_DEBIAN_DEBS=$cache deploy/images/build-debian.sh "$new" || { rm -rf "$new"; return 1; }
  echo "$digest" >"$new/inputs.sha256"
  local old="${new%.new-*}.old-$$"
  [ ! -d "$dir" ] || mv "$dir" "$old"
  mv "$new" "$dir"
  rm -rf "$old"
}

for step in "$@"; do "$step"; done
