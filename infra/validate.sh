#!/usr/bin/env bash
# Static validation of Meridian's deployment files (infra/ and the configs in
# them), for machines with no container runtime and no Kubernetes cluster.
#
#   bash infra/validate.sh
#
# What it checks (each step prints PASS or FAIL; the script exits 1 if any
# step failed, and never skips a step silently):
#   1. every YAML file under infra/ parses (PyYAML), every JSON file parses;
#   2. promtool check config (with the rule files) and promtool check rules,
#      plus every PromQL expression of the Grafana dashboard, through promtool;
#   3. Kubernetes manifests: apiVersion/kind/metadata.name/namespace, images,
#      probes pointing at declared ports that match the admin ports in the
#      ConfigMaps, hostNetwork/dnsPolicy, grace period > drain_delay +
#      graceful_timeout + preStop sleep, volumes, Service ports, selectors,
#      kustomization resources; then a schema check with kubernetes-validate
#      (OpenAPI schemas bundled in the PyPI package, works offline);
#   4. compose.yaml structure and Containerfiles (stages, non-root USER,
#      HEALTHCHECK, ENTRYPOINT, COPY sources exist);
#   5. the configs with the real binaries: `meridian-edge check` and
#      `meridian-dns check` on infra/containers/*.toml and on the configs
#      embedded in the k8s ConfigMaps (Secrets replaced by throwaway files);
#   6. every meridian_* metric name in the dashboard and the alert rules is
#      registered in edge/src/metrics/mod.rs or dns/src/metrics.rs, with a
#      suffix that fits its type (_total: counter; _bucket/_sum/_count:
#      histogram; none: gauge).
#
# Missing tools (PyYAML, promtool, kubernetes-validate) are installed when
# possible: pip for the Python packages, apt-get (as root) for promtool, from
# the Debian package "prometheus". If they cannot be installed, the step fails.
#
# Binaries: target/release/, then target/debug/, else `cargo run -q -p ...`.
# Set MERIDIAN_EDGE_BIN / MERIDIAN_DNS_BIN to use other builds.

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
INFRA="$ROOT/infra"
K8S_VERSION=${K8S_VERSION:-1.30.0}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/meridian-validate.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

FAILED=()
pass() { printf 'PASS  %s\n' "$1"; }
fail() { printf 'FAIL  %s\n' "$1" >&2; FAILED+=("$1"); }
step() { printf '\n== %s\n' "$1"; }
# run NAME CMD...: runs CMD, showing its output, and records PASS/FAIL.
run() {
    local name=$1; shift
    local out
    if out=$("$@" 2>&1); then
        [[ -n $out ]] && printf '%s\n' "$out" | sed 's/^/      /'
        pass "$name"
    else
        printf '%s\n' "$out" | sed 's/^/      /' >&2
        fail "$name"
    fi
}

is_root() { [[ $(id -u) -eq 0 ]]; }
apt_install() {
    is_root || return 1
    command -v apt-get >/dev/null || return 1
    # Update the package lists once, then install.
    if [[ ! -e $TMP/.apt-updated ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || return 1
        touch "$TMP/.apt-updated"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1
}
pip_install() {
    python3 -m pip install -q "$@" >/dev/null 2>&1 \
        || python3 -m pip install -q --break-system-packages "$@" >/dev/null 2>&1
}

# ---------------------------------------------------------------- tools
step "tools"
if ! command -v python3 >/dev/null; then
    apt_install python3 || true
fi
if ! command -v python3 >/dev/null; then
    fail "python3 is required (apt-get install python3)"
    printf '\n%d step(s) failed\n' "${#FAILED[@]}" >&2
    exit 1
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
    pip_install pyyaml || apt_install python3-yaml || true
fi
if python3 -c 'import yaml' 2>/dev/null; then
    pass "PyYAML $(python3 -c 'import yaml; print(yaml.__version__)')"
else
    fail "PyYAML is missing and could not be installed (pip install pyyaml, or apt-get install python3-yaml)"
    printf '\n%d step(s) failed\n' "${#FAILED[@]}" >&2
    exit 1
fi
if ! command -v promtool >/dev/null; then
    apt_install prometheus || true
fi
if command -v promtool >/dev/null; then
    pass "promtool: $(promtool --version 2>&1 | head -1)"
else
    fail "promtool is missing and could not be installed (as root: apt-get install prometheus)"
fi
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
    pip_install kubernetes-validate || true
fi
if python3 -c 'import kubernetes_validate' 2>/dev/null; then
    pass "kubernetes-validate $(python3 -c 'import kubernetes_validate.version as v; print(v.__version__)' 2>/dev/null || echo '?')"
else
    fail "kubernetes-validate is missing and could not be installed (pip install kubernetes-validate)"
fi

# ---------------------------------------------------------------- 1. syntax
step "1. YAML and JSON syntax"
run "parse every YAML and JSON file under infra/" python3 - "$INFRA" <<'PY'
import json, pathlib, sys, yaml
root = pathlib.Path(sys.argv[1])
bad = 0
files = sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
if not files:
    print("no YAML or JSON files found"); sys.exit(1)
for p in files:
    try:
        with p.open() as f:
            if p.suffix == ".json":
                json.load(f)
            else:
                docs = [d for d in yaml.safe_load_all(f) if d is not None]
                if not docs:
                    raise ValueError("empty document")
        print(f"ok   {p.relative_to(root.parent)}")
    except Exception as e:  # noqa: BLE001
        bad += 1
        print(f"BAD  {p.relative_to(root.parent)}: {e}")
sys.exit(1 if bad else 0)
PY

# ---------------------------------------------------------------- 2. prometheus
step "2. Prometheus config, rules and dashboard queries (promtool)"
if command -v promtool >/dev/null; then
    # promtool also stats files the config refers to (rule files, the bearer
    # token of the k8s job): check a copy with the absolute secret paths
    # pointed at throwaway files.
    mkdir -p "$TMP/prom/secrets"
    cp "$INFRA/prometheus/prometheus.yml" "$INFRA/prometheus/alerts.yml" "$TMP/prom/"
    grep -o 'credentials_file: *[^ ]*' "$TMP/prom/prometheus.yml" | awk '{print $2}' | sort -u |
        while read -r f; do
            n=$(basename "$f")
            echo dummy >"$TMP/prom/secrets/$n"
            sed -i "s#credentials_file: *$f#credentials_file: $TMP/prom/secrets/$n#" "$TMP/prom/prometheus.yml"
        done
    run "promtool check config infra/prometheus/prometheus.yml" promtool check config "$TMP/prom/prometheus.yml"
    run "promtool check rules infra/prometheus/alerts.yml" promtool check rules "$INFRA/prometheus/alerts.yml"
    # Every dashboard query becomes a recording rule, so promtool parses it.
    if python3 - "$INFRA/grafana/meridian.json" "$TMP/dashboard-rules.yml" <<'PY'
import json, sys, yaml
d = json.load(open(sys.argv[1]))
subs = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
        "$edge_instance": ".*", "$dns_instance": ".*"}
rules = []
def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))
exprs = [(p.get("title", "?"), t["expr"]) for p in walk(d["panels"]) for t in p.get("targets", []) if "expr" in t]
exprs += [("annotation " + a["name"], a["expr"]) for a in d.get("annotations", {}).get("list", []) if "expr" in a]
for i, (title, e) in enumerate(exprs):
    for k, v in subs.items():
        e = e.replace(k, v)
    rules.append({"record": f"dashboard:q{i}", "expr": e})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print(f"{len(rules)} dashboard queries")
PY
    then
        run "promtool parses every Grafana dashboard query" promtool check rules "$TMP/dashboard-rules.yml"
    else
        fail "could not extract the dashboard queries"
    fi
else
    fail "promtool checks not run: promtool is missing"
fi

# ---------------------------------------------------------------- 3. kubernetes
step "3. Kubernetes manifests"
run "structural checks of infra/k8s" python3 - "$INFRA/k8s" <<'PY'
import pathlib, re, sys, tomllib, yaml
root = pathlib.Path(sys.argv[1])
errors = []
def err(msg): errors.append(msg)
def dur(s):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", s.strip())
    if not m: return None
    n, u = int(m[1]), m[2]
    return n / 1000 if u == "ms" else n * {"s": 1, "m": 60, "h": 3600}[u]

kust = yaml.safe_load((root / "kustomization.yaml").read_text())
for key in ("apiVersion", "kind", "resources"):
    if key not in kust: err(f"kustomization.yaml: no {key}")
resources = kust.get("resources", [])
for r in resources:
    if not (root / r).is_file(): err(f"kustomization.yaml: resource {r} does not exist")
for p in sorted(root.glob("*.yaml")):
    if p.name != "kustomization.yaml" and p.name not in resources:
        err(f"{p.name} is not listed in kustomization.yaml resources")
ns_name = kust.get("namespace")

objs = []
for r in resources:
    for d in yaml.safe_load_all((root / r).read_text()):
        if d is None: continue
        objs.append((r, d))
        for key in ("apiVersion", "kind"):
            if not d.get(key): err(f"{r}: an object without {key}")
        md = d.get("metadata") or {}
        if not md.get("name"): err(f"{r}: {d.get('kind')} without metadata.name")
        if d.get("kind") != "Namespace" and ns_name and md.get("namespace") not in (None, ns_name):
            err(f"{r}: {d.get('kind')}/{md.get('name')} is in namespace {md.get('namespace')}, not {ns_name}")
by = {(d["kind"], d["metadata"]["name"]): (f, d) for f, d in objs if d.get("kind") and d.get("metadata")}
if ("Namespace", ns_name) not in by: err(f"no Namespace {ns_name}")

def cm_toml(name, key):
    f, cm = by.get(("ConfigMap", name), (None, None))
    if cm is None:
        err(f"no ConfigMap {name}"); return {}
    try:
        return tomllib.loads(cm["data"][key])
    except Exception as e:  # noqa: BLE001
        err(f"ConfigMap {name} key {key}: TOML does not parse: {e}"); return {}

def port_of(p):
    return int(p.rsplit(":", 1)[1]) if p else None

def check_pod(kind, name, spec, labels, tmpl_md):
    pod = spec["template"]["spec"]
    sel = spec.get("selector", {}).get("matchLabels", {})
    if not sel or any(labels.get(k) != v for k, v in sel.items()):
        err(f"{kind}/{name}: selector {sel} does not match the template labels {labels}")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    for v in vols.values():
        if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in by:
            err(f"{kind}/{name}: volume {v['name']} uses ConfigMap {v['configMap']['name']}, which is not in the manifests")
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        cn = f"{kind}/{name} container {c.get('name')}"
        if not c.get("image"): err(f"{cn}: no image")
        for m in c.get("volumeMounts", []):
            if m["name"] not in vols: err(f"{cn}: mounts unknown volume {m['name']}")
    containers = pod.get("containers", [])
    if not containers: err(f"{kind}/{name}: no containers")
    return pod, containers

def probe_port(c, probe):
    pr = c.get(probe)
    if not pr: return None, None
    hg = pr.get("httpGet") or {}
    port = hg.get("port")
    names = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    if isinstance(port, str): port = names.get(port)
    return port, hg.get("path")

# ---- edge DaemonSet
edge_cfg = cm_toml("meridian-edge-config", "edge.toml")
f, ds = by.get(("DaemonSet", "meridian-edge"), (None, None))
if ds is None:
    err("no DaemonSet meridian-edge")
else:
    pod, cs = check_pod("DaemonSet", "meridian-edge", ds["spec"], ds["spec"]["template"]["metadata"].get("labels", {}), None)
    c = cs[0]
    if pod.get("hostNetwork") is not True: err("edge DaemonSet: hostNetwork is not true")
    if pod.get("dnsPolicy") != "ClusterFirstWithHostNet": err("edge DaemonSet: dnsPolicy is not ClusterFirstWithHostNet")
    admin = port_of(edge_cfg.get("admin", {}).get("listen", "127.0.0.1:9901"))
    if edge_cfg.get("admin", {}).get("listen", "").startswith("127."):
        err("edge ConfigMap: admin.listen is loopback; the kubelet probes could not reach it")
    declared = {p["containerPort"] for p in c.get("ports", [])}
    if admin not in declared: err(f"edge container does not declare the admin port {admin}")
    for l in edge_cfg.get("listeners", []):
        if port_of(l["address"]) not in declared: err(f"edge container does not declare listener port {l['address']}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        port, p = probe_port(c, probe)
        if p != path or port != admin:
            err(f"edge {probe}: {p} on port {port}, want {path} on the admin port {admin}")
    sp, spath = probe_port(c, "startupProbe")
    if sp is not None and sp != admin: err(f"edge startupProbe on port {sp}, not the admin port {admin}")
    srv = edge_cfg.get("server", {})
    graceful = dur(srv.get("graceful_timeout", "30s")); drain = dur(srv.get("drain_delay", "0s"))
    pre = c.get("lifecycle", {}).get("preStop")
    sleep = 0
    if not pre:
        err("edge container: no preStop hook")
    else:
        txt = " ".join(pre.get("exec", {}).get("command", [])) if "exec" in pre else ""
        m = re.search(r"sleep\s+(\d+)", txt)
        if "sleep" in pre: sleep = int(pre["sleep"]["seconds"])
        elif m: sleep = int(m[1])
        else: err("edge preStop does not sleep")
        if "exec" in pre and "/drain" in txt and f":{admin}/drain" not in txt:
            err("edge preStop calls /drain on a port other than the admin port")
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    if tgps <= sleep + drain + graceful:
        err(f"edge terminationGracePeriodSeconds {tgps} <= preStop sleep {sleep} + drain_delay {drain} + graceful_timeout {graceful}")
    else:
        print(f"edge: grace {tgps}s > preStop {sleep}s + drain_delay {drain:g}s + graceful_timeout {graceful:g}s")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    disk_dir = edge_cfg.get("cache", {}).get("disk_dir")
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    if disk_dir:
        v = vols.get(mounts.get(disk_dir))
        if not v or not ("hostPath" in v or "emptyDir" in v):
            err(f"edge: cache.disk_dir {disk_dir} is not a hostPath or emptyDir mount")
    cmd = c.get("command", []) + c.get("args", [])
    if "--config" in cmd:
        cfgpath = cmd[cmd.index("--config") + 1]
        if not any(cfgpath.startswith(mp.rstrip("/") + "/") and "configMap" in vols.get(n, {}) for mp, n in mounts.items()):
            err(f"edge: --config {cfgpath} is not inside a ConfigMap mount")
    for t in edge_cfg.get("tls", {}).get("certificates", []):
        for k in ("cert", "key"):
            if not any(t[k].startswith(mp.rstrip("/") + "/") for mp in mounts):
                err(f"edge: tls {k} {t[k]} is not inside a mounted volume")
    for key in ("token_file", "read_token_file"):
        tf = edge_cfg.get("admin", {}).get(key)
        if tf and not any(tf.startswith(mp.rstrip("/") + "/") for mp in mounts):
            err(f"edge: admin.{key} {tf} is not inside a mounted volume")

# ---- dns Deployment and Service
dns_cfg = cm_toml("meridian-dns-config", "dns.toml")
f, dep = by.get(("Deployment", "meridian-dns"), (None, None))
if dep is None:
    err("no Deployment meridian-dns")
else:
    labels = dep["spec"]["template"]["metadata"].get("labels", {})
    pod, cs = check_pod("Deployment", "meridian-dns", dep["spec"], labels, None)
    c = cs[0]
    if dep["spec"].get("replicas") != 2: err(f"dns Deployment: replicas is {dep['spec'].get('replicas')}, want 2")
    admin = port_of(dns_cfg.get("server", {}).get("admin", "127.0.0.1:9953"))
    if dns_cfg.get("server", {}).get("admin", "").startswith("127."):
        err("dns ConfigMap: server.admin is loopback; the kubelet probes could not reach it")
    for probe in ("livenessProbe", "readinessProbe"):
        port, p = probe_port(c, probe)
        if p != "/healthz" or port != admin:
            err(f"dns {probe}: {p} on port {port}, want /healthz on the admin port {admin}")
    listen = {port_of(a) for a in dns_cfg.get("server", {}).get("listen", [])}
    cports = {(p["containerPort"], p.get("protocol", "TCP")): p.get("name") for p in c.get("ports", [])}
    for lp in listen:
        for proto in ("UDP", "TCP"):
            if (lp, proto) not in cports: err(f"dns container does not declare {lp}/{proto}")
    files = set(by[("ConfigMap", "meridian-dns-config")][1]["data"])
    for z in dns_cfg.get("zones", []):
        if z["file"] not in files: err(f"dns ConfigMap: zone file {z['file']} is not a key of the ConfigMap")
    csv = dns_cfg.get("geoip", {}).get("csv")
    if csv and csv not in files: err(f"dns ConfigMap: geoip csv {csv} is not a key of the ConfigMap")
    f, svc = by.get(("Service", "meridian-dns"), (None, None))
    if svc is None:
        err("no Service meridian-dns")
    else:
        if any(labels.get(k) != v for k, v in svc["spec"].get("selector", {}).items()):
            err("Service meridian-dns: selector does not match the dns pods")
        got = {(p["port"], p.get("protocol", "TCP")) for p in svc["spec"]["ports"]}
        if not {(53, "UDP"), (53, "TCP")} <= got: err(f"Service meridian-dns: ports {got}, want 53/UDP and 53/TCP")
        names = {v: k for k, v in cports.items()}
        for p in svc["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            target = names.get(tp) if isinstance(tp, str) else (tp, p.get("protocol", "TCP"))
            if target is None or target not in cports or target[1] != p.get("protocol", "TCP"):
                err(f"Service meridian-dns port {p.get('name')}: targetPort {tp} is not a {p.get('protocol', 'TCP')} container port")

# ---- every Service selects some pod template
templates = [d["spec"]["template"]["metadata"].get("labels", {}) for f, d in objs if d.get("kind") in ("Deployment", "DaemonSet")]
for f, d in objs:
    if d.get("kind") == "Service":
        sel = d["spec"].get("selector", {})
        if not any(all(t.get(k) == v for k, v in sel.items()) for t in templates):
            err(f"Service {d['metadata']['name']} selects no pods")

for e in errors: print("  -", e)
print(f"{len(objs)} objects in {len(resources)} files; {len(errors)} problem(s)")
sys.exit(1 if errors else 0)
PY
if python3 -c 'import kubernetes_validate' 2>/dev/null; then
    # The Kustomization is not an API object: kubernetes-validate has no schema for it.
    mapfile -t manifests < <(cd "$INFRA/k8s" && ls ./*.yaml | grep -v kustomization.yaml)
    run "kubernetes-validate --strict (Kubernetes $K8S_VERSION schemas, offline)" \
        bash -c 'cd "$1" && shift && python3 -m kubernetes_validate --strict -k "$0" "$@"' "$K8S_VERSION" "$INFRA/k8s" "${manifests[@]}"
else
    fail "kubernetes-validate schema check not run: the package is missing"
fi

# ---------------------------------------------------------------- 4. containers
step "4. compose.yaml and Containerfiles"
run "compose.yaml and Containerfile structure" python3 - "$ROOT" <<'PY'
import pathlib, re, shlex, sys, tomllib, yaml
root = pathlib.Path(sys.argv[1]); cdir = root / "infra/containers"
errors = []
def err(m): errors.append(m)
c = yaml.safe_load((cdir / "compose.yaml").read_text())
svcs = c.get("services", {})
for s in ("origin", "edge", "dns"):
    if s not in svcs: err(f"compose: no service {s}")
named = set((c.get("volumes") or {}).keys())
for name, s in svcs.items():
    b = s.get("build")
    if b:
        ctx = (cdir / b.get("context", ".")).resolve()
        if not (ctx / b.get("dockerfile", "Dockerfile")).is_file():
            err(f"compose {name}: dockerfile {b.get('dockerfile')} not found in context {ctx}")
    for v in s.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith((".", "/")):
            if not (cdir / src).exists(): err(f"compose {name}: bind source {src} does not exist")
        elif src not in named:
            err(f"compose {name}: volume {src} is not declared under volumes:")
    for d in (s.get("depends_on") or {}):
        if d not in svcs: err(f"compose {name}: depends_on unknown service {d}")
edge = svcs.get("edge", {})
ecfg = tomllib.loads((cdir / "edge.toml").read_text())
disk_dir = ecfg.get("cache", {}).get("disk_dir")
if not any(v.split(":")[1] == disk_dir and v.split(":")[0] in named for v in edge.get("volumes", [])):
    err(f"compose edge: cache.disk_dir {disk_dir} is not a named volume")
if not any(v.split(":")[1] == "/etc/meridian/edge.toml" for v in edge.get("volumes", [])):
    err("compose edge: edge.toml is not mounted at /etc/meridian/edge.toml")
if "http://origin:8081" not in [o["url"] for p in ecfg.get("pools", {}).values() for o in p["origins"]]:
    err("compose edge.toml: no pool fronts http://origin:8081")
if not ecfg.get("admin", {}).get("listen", "").startswith("0.0.0.0:9901"):
    err("compose edge.toml: admin.listen is not 0.0.0.0:9901")
ent = svcs.get("origin", {}).get("entrypoint", [])
if "origin" not in ent or "0.0.0.0:8081" not in ent:
    err("compose origin: not running `meridian-edge origin --listen 0.0.0.0:8081`")
# The DNS region answers and probes the edge's fixed address.
dcfg = tomllib.loads((cdir / "dns.toml").read_text())
eip = edge.get("networks", {}).get("meridian", {}).get("ipv4_address")
if not any(eip in [a if isinstance(a, str) else a["addr"] for a in r.get("a", [])] for r in dcfg.get("regions", [])):
    err(f"compose dns.toml: no region answers the edge's address {eip}")
if eip and not any(r.get("health", {}).get("address", "").startswith(eip + ":") for r in dcfg.get("regions", [])):
    err(f"compose dns.toml: no region health-checks the edge at {eip}")
stop = edge.get("stop_grace_period", "10s")
m = re.fullmatch(r"(\d+)s", stop)
srv = ecfg.get("server", {})
need = int(srv.get("graceful_timeout", "30s").rstrip("s")) + int(srv.get("drain_delay", "0s").rstrip("s"))
if not m or int(m[1]) <= need: err(f"compose edge: stop_grace_period {stop} <= drain_delay + graceful_timeout ({need}s)")

for name, binary, cfg in (("edge", "meridian-edge", "/etc/meridian/edge.toml"), ("dns", "meridian-dns", "/etc/meridian/dns.toml")):
    p = cdir / f"Containerfile.{name}"
    t = p.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", t, re.M)
    if not froms or not re.search(r"rust:1\.95-bookworm$", froms[0]): err(f"{p.name}: the first stage is not rust:1.95-bookworm ({froms[:1]})")
    if not froms or not froms[-1].endswith("debian:bookworm-slim"): err(f"{p.name}: the runtime stage is not debian:bookworm-slim")
    if f"cargo build --release --locked -p {binary}" not in t: err(f"{p.name}: no cargo build --release -p {binary}")
    for k in ("ca-certificates", "curl", "HEALTHCHECK", "EXPOSE", "useradd"):
        if k not in t: err(f"{p.name}: no {k}")
    users = re.findall(r"^USER\s+(\S+)", t, re.M)
    if not users or users[-1].split(":")[0] in ("root", "0"): err(f"{p.name}: the final USER is not a non-root user")
    if not re.search(r'^ENTRYPOINT \[.*"run", "--config", "' + re.escape(cfg) + '"\]', t, re.M):
        err(f"{p.name}: ENTRYPOINT is not `{binary} run --config {cfg}`")
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", t, re.M):
        for src in shlex.split(line)[:-1]:
            if not (root / src).exists(): err(f"{p.name}: COPY source {src} does not exist in the repository")
for e in errors: print("  -", e)
print(f"{len(svcs)} compose services, 2 Containerfiles; {len(errors)} problem(s)")
sys.exit(1 if errors else 0)
PY

# ---------------------------------------------------------------- 5. configs
step "5. configs checked by the real binaries"
find_bin() {  # find_bin NAME ENVVAR -> prints a command
    local name=$1 env=$2
    if [[ -n ${!env:-} ]]; then echo "${!env}"; return; fi
    for d in release debug; do
        if [[ -x $ROOT/target/$d/$name ]]; then echo "$ROOT/target/$d/$name"; return; fi
    done
    if command -v cargo >/dev/null; then echo "cargo run -q --manifest-path $ROOT/Cargo.toml -p $name --"; return; fi
    return 1
}
EDGE=$(find_bin meridian-edge MERIDIAN_EDGE_BIN) || EDGE=
DNS=$(find_bin meridian-dns MERIDIAN_DNS_BIN) || DNS=
echo "meridian-edge: ${EDGE:-not found}"
echo "meridian-dns:  ${DNS:-not found}"

# The k8s ConfigMaps' files, with /etc/meridian/{tls,admin} (Secrets) replaced
# by throwaway files in $TMP.
mkdir -p "$TMP/k8s-edge/tls" "$TMP/k8s-edge/admin" "$TMP/k8s-dns"
python3 - "$INFRA/k8s" "$TMP" <<'PY' || fail "could not extract the ConfigMaps"
import pathlib, sys, yaml
k8s, tmp = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
e = yaml.safe_load((k8s / "edge-configmap.yaml").read_text())["data"]["edge.toml"]
e = e.replace("/etc/meridian/tls/", f"{tmp}/k8s-edge/tls/").replace("/etc/meridian/admin/", f"{tmp}/k8s-edge/admin/")
(tmp / "k8s-edge/edge.toml").write_text(e)
for k, v in yaml.safe_load((k8s / "dns-configmap.yaml").read_text())["data"].items():
    (tmp / "k8s-dns" / k).write_text(v.replace("/etc/meridian/admin/", f"{tmp}/k8s-dns/admin/"))
PY
# meridian-dns's admin tokens (Secret meridian-dns-admin-token; compose secrets).
mkdir -p "$TMP/k8s-dns/admin" "$TMP/compose-dns"
echo "throwaway-dns-token" >"$TMP/k8s-dns/admin/token"
echo "throwaway-dns-read-token" >"$TMP/k8s-dns/admin/read-token"
echo "throwaway-dns-token" >"$TMP/compose-dns/dns_admin_token"
echo "throwaway-dns-read-token" >"$TMP/compose-dns/dns_read_token"
sed "s#/run/secrets/#$TMP/compose-dns/#" "$INFRA/containers/dns.toml" >"$INFRA/containers/.dns.validate.toml"
trap 'rm -rf "$TMP" "$INFRA/containers/.dns.validate.toml"' EXIT
echo "throwaway-admin-token" >"$TMP/k8s-edge/admin/token"
echo "throwaway-admin-read-token" >"$TMP/k8s-edge/admin/read-token"
# meridian-edge's admin tokens (compose secrets edge_admin_token, edge_read_token).
mkdir -p "$TMP/compose-edge"
echo "throwaway-edge-token" >"$TMP/compose-edge/edge_admin_token"
echo "throwaway-edge-read-token" >"$TMP/compose-edge/edge_read_token"
sed "s#/run/secrets/#$TMP/compose-edge/#" "$INFRA/containers/edge.toml" >"$INFRA/containers/.edge.validate.toml"
trap 'rm -rf "$TMP" "$INFRA/containers/.dns.validate.toml" "$INFRA/containers/.edge.validate.toml"' EXIT
if command -v openssl >/dev/null; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=www.example.com \
        -addext subjectAltName=DNS:www.example.com,DNS:example.com \
        -keyout "$TMP/k8s-edge/tls/tls.key" -out "$TMP/k8s-edge/tls/tls.crt" >/dev/null 2>&1
else
    echo "(openssl not found: the stand-in certificate files are empty)"
    : >"$TMP/k8s-edge/tls/tls.crt"; : >"$TMP/k8s-edge/tls/tls.key"
fi

if [[ -n $EDGE ]]; then
    run "meridian-edge check --config infra/containers/edge.toml (secrets: throwaway files)" bash -c "cd '$ROOT' && $EDGE check --config infra/containers/.edge.validate.toml"
    run "meridian-edge check: infra/k8s/edge-configmap.yaml (edge.toml)" bash -c "$EDGE check --config '$TMP/k8s-edge/edge.toml'"
else
    fail "meridian-edge check not run: no binary in target/ and no cargo"
fi
if [[ -n $DNS ]]; then
    run "meridian-dns check --config infra/containers/dns.toml (secrets: throwaway files)" bash -c "cd '$ROOT' && $DNS check --config infra/containers/.dns.validate.toml"
    run "meridian-dns check: infra/k8s/dns-configmap.yaml (dns.toml + zone + csv)" bash -c "$DNS check --config '$TMP/k8s-dns/dns.toml'"
else
    fail "meridian-dns check not run: no binary in target/ and no cargo"
fi

# ---------------------------------------------------------------- 6. metric names
step "6. metric names in the dashboard and alerts exist in the Rust sources"
run "every meridian_* name is registered, with a suffix fitting its type" python3 - "$ROOT" <<'PY'
import json, pathlib, re, sys
root = pathlib.Path(sys.argv[1])
known = {}  # exposed name -> (source, type)
for src in ("edge/src/metrics/mod.rs", "dns/src/metrics.rs"):
    t = (root / src).read_text()
    pre = re.search(r'Registry::with_prefix\("([a-z_]+)"\)', t)
    if not pre:
        print(f"{src}: no Registry::with_prefix"); sys.exit(1)
    fields = dict(re.findall(r"^\s*pub\s+(\w+)\s*:\s*(.+),\s*$", t, re.M))
    regs = re.findall(r'register\(\s*"(\w+)",\s*"(?:[^"\\]|\\.)*",\s*(?:m\.)?(\w+)\.clone\(\)', t, re.S)
    if not regs:
        print(f"{src}: no registry.register calls found"); sys.exit(1)
    for name, field in regs:
        ty = fields.get(field, "")
        kind = "counter" if "Counter" in ty else "histogram" if "Histogram" in ty else "gauge" if "Gauge" in ty else None
        if kind is None:
            print(f"{src}: cannot tell the type of {name} (field {field}: {ty!r})"); sys.exit(1)
        base = f"{pre[1]}_{name}"
        if kind == "counter":
            names = [base + "_total"]
        elif kind == "histogram":
            names = [base + s for s in ("_bucket", "_sum", "_count")]
        else:
            names = [base]
        for n in names:
            known[n] = (src, kind)
print(f"{len(known)} exposed series names registered in the sources")
files = ["infra/grafana/meridian.json", "infra/prometheus/alerts.yml"]
bad = 0
for f in files:
    text = (root / f).read_text()
    used = sorted(set(re.findall(r"\bmeridian_[a-z0-9_]+", text)))
    if not used:
        print(f"{f}: no meridian_ metric names found"); bad += 1
    for n in used:
        if n not in known:
            bad += 1
            print(f"{f}: {n} is not a registered metric (with its type's suffix)")
    print(f"{f}: {len(used)} names, {sum(n in known for n in used)} known")
sys.exit(1 if bad else 0)
PY

# ---------------------------------------------------------------- summary
echo
if ((${#FAILED[@]})); then
    printf '%d step(s) FAILED:\n' "${#FAILED[@]}" >&2
    printf '  - %s\n' "${FAILED[@]}" >&2
    exit 1
fi
echo "all checks passed"
