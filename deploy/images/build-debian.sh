#!/bin/bash
# Build phyllome-debian, a Debian 12 cloud guest, into OUTDIR:
#   disk.raw       sparse RAW GPT disk (2 GiB virtual): a 64 MiB ESP with signed shim ->
#                  signed GRUB (boots under OVMF with Secure Boot) and an ext4 root made by
#                  mmdebstrap from Debian packages: systemd (networkd, DHCP on every NIC),
#                  cloud-init (NoCloud only), qemu-guest-agent, openssh-server, sudo and
#                  Debian's signed kernel; serial console on ttyS0
#   manifest.json  sha256 and size of disk.raw, kernel version, Debian package versions,
#                  build time
#
# Usage: deploy/images/build-debian.sh OUTDIR
#
# Runs as root (mmdebstrap's root mode: dpkg runs in a chroot) and mounts nothing itself: the
# root file system is written by `mkfs.ext4 -d`, the ESP with mtools, the GPT with sgdisk.
# apt reads the host's Debian sources ($PHYLLOME_DEBIAN_SOURCES, default the host's
# debian.sources or sources.list) and the host's apt configuration; downloaded .deb files stay
# in $PHYLLOME_DEBIAN_DEBS when set, so rebuilds download nothing new. Host tools (apt
# packages): mmdebstrap, e2fsprogs (mkfs.ext4 with -d), gdisk (sgdisk), dosfstools
# (mkfs.vfat), mtools. Fixed GUIDs, UUIDs, FAT volume id and timestamps; the same packages
# give the same file system contents (dpkg's own logs and caches aside).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
out=$1
started=$(date +%s)
epoch=${SOURCE_DATE_EPOCH:-1700000000}
disk_mib=2048
esp_mib=64
root_uuid=7079786c-6c6f-4d65-8000-0000000000d1
esp_serial=50484442 # FAT volume id 5048-4442
disk_guid=7079786c-6c6f-4d65-8000-0000000000d0
esp_guid=7079786c-6c6f-4d65-8000-0000000000d2
root_guid=7079786c-6c6f-4d65-8000-0000000000d3
packages=$(grep -v '^#' "$here/debian/packages" | xargs)

if [ "$(id -u)" -ne 0 ]; then
    echo "build-debian: run as root (mmdebstrap installs the packages in a chroot)" >&2
    exit 1
fi
for tool in mmdebstrap mkfs.ext4 sgdisk mkfs.vfat mmd mcopy sha256sum; do
    command -v "$tool" >/dev/null || {
        echo "build-debian: '$tool' not found; install: apt-get install mmdebstrap" \
            "e2fsprogs gdisk dosfstools mtools" >&2
        exit 1
    }
done
. /etc/os-release
if [ "${VERSION_CODENAME:-}" != bookworm ] && [ -z "${PHYLLOME_DEBIAN_SUITE:-}" ]; then
    echo "build-debian: the host is not Debian 12 (bookworm): set PHYLLOME_DEBIAN_SUITE" \
        "and PHYLLOME_DEBIAN_SOURCES" >&2
    exit 1
fi
suite=${PHYLLOME_DEBIAN_SUITE:-bookworm}
sources=${PHYLLOME_DEBIAN_SOURCES:-}
if [ -z "$sources" ]; then
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        if [ -s "$f" ] && grep -q '^[^#]' "$f"; then
            sources=$f
            break
        fi
    done
fi
if [ -z "$sources" ] || [ ! -s "$sources" ]; then
    echo "build-debian: no Debian apt sources on this host; set PHYLLOME_DEBIAN_SOURCES" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
debs=${PHYLLOME_DEBIAN_DEBS:-$work/debs}
mkdir -p "$debs" "$out"
debs=$(cd "$debs" && pwd)
root=$work/root
# The host's Acquire:: settings (a proxy, Check-Valid-Until of a snapshot mirror) apply in
# the chroot too (and are removed from the image at the end).
apt-config dump | grep '^Acquire::' | grep -v '^Acquire::Languages' >"$work/apt.conf" || true

# --- root file system (mmdebstrap) ------------------------------------------------------
grep -v '^#' "$here/debian/dpkg.cfg" >"$work/dpkg.cfg"
SOURCE_DATE_EPOCH=$epoch mmdebstrap --mode=root --variant=minbase --format=directory \
    --aptopt="$work/apt.conf" \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt="$work/dpkg.cfg" \
    --include="$(echo "$packages" | tr ' ' ,)" \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
    --setup-hook="sync-in '$debs' /var/cache/apt/archives/" \
    --essential-hook="mkdir -p \"\$1/etc/initramfs-tools/conf.d\" && cp '$here/debian/initramfs.conf' \"\$1/etc/initramfs-tools/conf.d/phyllome.conf\"" \
    --customize-hook="sync-out /var/cache/apt/archives '$debs'" \
    --customize-hook="'$here/debian/customize' \"\$1\" $root_uuid" \
    "$suite" "$root" "$sources" >"$work/mmdebstrap.log" 2>&1 || {
    tail -40 "$work/mmdebstrap.log" >&2
    echo "build-debian: mmdebstrap failed" >&2
    exit 1
}
rm -f "$debs"/lock
rm -rf "$debs"/partial

vmlinuz=$(ls "$root"/boot/vmlinuz-* | head -1)
kver=${vmlinuz##*/vmlinuz-}
dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Package} ${Version}\n' >"$work/packages"

# --- ESP (mtools) -----------------------------------------------------------------------
export MTOOLS_SKIP_CHECK=1 SOURCE_DATE_EPOCH=$epoch
esp=$work/esp.img
mkfs.vfat -C --invariant -i "$esp_serial" -n ESP "$esp" $((esp_mib * 1024)) >/dev/null
sed "s/@ROOT_UUID@/$root_uuid/g" "$here/debian/grub.cfg" >"$work/grub.cfg"
efi() { cp "$1" "$work/$2" && touch -d "@$epoch" "$work/$2" && echo "$work/$2"; }
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/debian
for dir in BOOT debian; do
    mcopy -m -i "$esp" "$(efi "$root/usr/lib/shim/shimx64.efi.signed" shimx64.efi)" \
        "::/EFI/$dir/$([ $dir = BOOT ] && echo BOOTX64.EFI || echo shimx64.efi)"
    mcopy -m -i "$esp" "$(efi "$root/usr/lib/shim/mmx64.efi.signed" mmx64.efi)" ::/EFI/$dir/
    mcopy -m -i "$esp" "$(efi "$root/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed" \
        grubx64.efi)" ::/EFI/$dir/
done
touch -d "@$epoch" "$work/grub.cfg"
mcopy -m -i "$esp" "$work/grub.cfg" ::/EFI/debian/

# --- root file system (mkfs.ext4 -d) and disk -------------------------------------------
disk=$work/disk.raw
truncate -s "${disk_mib}M" "$disk"
root_start=$((1 + esp_mib)) # MiB
sgdisk -U "$disk_guid" \
    -n "1:2048:+${esp_mib}M" -t 1:ef00 -c "1:EFI system partition" -u "1:$esp_guid" \
    -n "2:$((root_start * 2048)):0" -t 2:8304 -c "2:root" -u "2:$root_guid" \
    "$disk" >/dev/null
root_sectors=$(sgdisk -i 2 "$disk" | awk '/^Partition size:/ {print $3}')
dd if="$esp" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
find "$root" -xdev -newermt "@$epoch" -exec touch -h -d "@$epoch" {} + 2>/dev/null || true
E2FSPROGS_FAKE_TIME=$epoch mkfs.ext4 -q -F -L root -U "$root_uuid" -d "$root" \
    -E "offset=$((root_start << 20)),hash_seed=$root_uuid" -T default \
    "$disk" "$((root_sectors / 2))k"

# --- output -----------------------------------------------------------------------------
cp --sparse=always "$disk" "$out/disk.raw"
chmod 644 "$out/disk.raw"
seconds=$(($(date +%s) - started))
{
    printf '{\n  "name": "phyllome-debian",\n  "kernel_version": "%s",\n' "$kver"
    printf '  "suite": "%s",\n  "disk_format": "raw",\n  "root_uuid": "%s",\n' \
        "$suite" "$root_uuid"
    printf '  "build_seconds": %s,\n' "$seconds"
    printf '  "packages": {'
    sep=
    while read -r name version; do
        printf '%s\n    "%s": "%s"' "$sep" "$name" "$version"
        sep=,
    done <"$work/packages"
    printf '\n  },\n  "files": {'
    printf '\n    "disk.raw": {"sha256": "%s", "size": %s}' \
        "$(sha256sum "$out/disk.raw" | cut -d' ' -f1)" "$(stat -c %s "$out/disk.raw")"
    printf '\n  }\n}\n'
} >"$out/manifest.json"
chmod 644 "$out/manifest.json"
echo "build-debian: phyllome-debian (Debian $suite, kernel $kver, $(du -m "$out/disk.raw" |
    cut -f1) MiB used of ${disk_mib} MiB) in $out in ${seconds} s"
