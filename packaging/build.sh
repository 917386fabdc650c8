#!/usr/bin/env bash
# Builds the dualhomed .deb and .rpm for amd64 and arm64 into dist/.
# Needs only the Go toolchain: nfpm is run through `go run` at a pinned
# version (it does not touch our go.mod). Generated docs and man pages are
# dated from the commit (SOURCE_DATE_EPOCH) and compressed without timestamps.
set -euo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-go}
NFPM_VERSION=v2.45.2
ARCHES=${ARCHES:-"amd64 arm64"}
BUILD=$PWD/build/package
DIST=dist
# The main package to build; only a test of this script points it elsewhere.
MAIN_DIR=${DUALHOMED_MAIN_DIR:-$PWD/cmd/dualhomed}

# Version. The binary gets git describe as is (like the Makefile); packages
# need a version that sorts: v1.2.3 -> 1.2.3, v1.2.3-4-gabc -> 1.2.3+git4.abc,
# no tag -> 0.0.0~git<commit date>.<hash> (sorts below any release).
describe=$(git describe --tags --always --dirty 2>/dev/null || echo dev)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
if [[ $describe =~ ^v?([0-9]+\.[0-9]+\.[0-9]+)(-([0-9]+)-g([0-9a-f]+))?(-dirty)?$ ]]; then
	PKGVER=${BASH_REMATCH[1]}
	[ -n "${BASH_REMATCH[3]}" ] && PKGVER+="+git${BASH_REMATCH[3]}.${BASH_REMATCH[4]}"
	[ -n "${BASH_REMATCH[5]}" ] && PKGVER+=".dirty"
else
	hash=$(git rev-parse --short HEAD 2>/dev/null || echo 0)
	PKGVER="0.0.0~git$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y%m%d).$hash"
	[[ $describe == *-dirty ]] && PKGVER+=".dirty"
fi
export PKGVER
echo "== dualhomed $describe, package version $PKGVER-1"

# The example configuration (written with the agent). Until it exists the
# package carries a stub that says so.
CONFIG=packaging/dualhomed.yaml
if [ ! -f "$CONFIG" ]; then
	echo "warning: $CONFIG missing, shipping a placeholder config" >&2
	mkdir -p "$BUILD"
	CONFIG=$BUILD/dualhomed.yaml
	printf '# dualhomed configuration: see dualhomed(1).\n# Placeholder: packaging/dualhomed.yaml was missing at build time.\n' >"$CONFIG"
fi
export CONFIG

rm -rf "$BUILD/stage" "$DIST"
mkdir -p "$BUILD/stage" "$DIST"

# Man pages come from the command definitions: run the binary built for the
# build machine, then compress them the way Debian wants (gzip -9n: no name,
# no timestamp, so the result is reproducible).
host_bin=$BUILD/host/dualhomed
CGO_ENABLED=0 "$GO" build -C "$MAIN_DIR" -trimpath -o "$host_bin" .
man=$BUILD/man
rm -rf "$man" && mkdir -p "$man"
"$host_bin" gen-man "$man"
ls "$man"/*.1 >/dev/null 2>&1 || { echo "gen-man wrote no man pages into $man" >&2; exit 1; }
for page in "$man"/*.1; do
	touch -d "@$SOURCE_DATE_EPOCH" "$page"
	gzip -9nf "$page"
done
chmod 0755 "$man" && chmod 0644 "$man"/*.1.gz
"$host_bin" completion bash >"$BUILD/bash-completion"
chmod 0644 "$BUILD/bash-completion"

# Debian documentation: DEP-5 copyright and a changelog whose top entry
# matches the package version (lintian checks both).
debdoc=$BUILD/deb
mkdir -p "$debdoc"
year=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y)
sed "s/@YEAR@/$year/" packaging/deb/copyright.in >"$debdoc/copyright"
{
	printf 'dualhomed (%s-1) unstable; urgency=medium\n\n' "$PKGVER"
	printf '  * Release %s (git %s). See\n' "$PKGVER" "$describe"
	printf '    https://github.com/dualhomed/dualhomed for the history.\n\n'
	printf ' -- dualhomed maintainers <dualhomed@users.noreply.github.com>  %s\n' \
		"$(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")"
} >"$debdoc/changelog.Debian"
touch -d "@$SOURCE_DATE_EPOCH" "$debdoc/changelog.Debian"
gzip -9nf "$debdoc/changelog.Debian"

for arch in $ARCHES; do
	stage=$BUILD/stage/$arch
	mkdir -p "$stage"
	echo "== building linux/$arch"
	CGO_ENABLED=0 GOOS=linux GOARCH=$arch "$GO" build -C "$MAIN_DIR" -trimpath \
		-ldflags "-s -w -X main.version=$describe" -o "$stage/dualhomed" .
	cp -r "$man" "$stage/man"
	cp "$BUILD/bash-completion" "$stage/bash-completion"
	cp -r "$debdoc" "$stage/deb"
	for format in deb rpm; do
		ARCH=$arch STAGE=$stage "$GO" run "github.com/goreleaser/nfpm/v2/cmd/nfpm@$NFPM_VERSION" \
			package --config packaging/nfpm.yaml --packager "$format" --target "$DIST/"
	done
done

ls -l "$DIST"
