"""What no schema knows about deploy/: run by check.sh after rendering.

Usage: check_manifests.py DEPLOY_DIR RENDERED_DIR

Checks that the timing numbers of the manifests agree with each other and with the longest
call (ARCHITECTURE.md's shutdown order: readiness fails, drain delay, grace), that every pod
is written for the "restricted" Pod Security profile, that no Secret or credential is in a
manifest, that the PrometheusRule carries exactly the rules file, and that the dashboard is
valid JSON. Prints every failure, exits 1 if any.
"""

import json
import re
import sys
from pathlib import Path

import yaml

LONGEST_CALL_SECS = 300  # protocol::CALL_TIMEOUT_MAX_MS
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)


def load(path):
    return [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc]


def by_kind(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def secs(duration):
    """'30s', '2m' or a number of seconds."""
    match = re.fullmatch(r"(\d+)(s|m)?", str(duration).strip().strip('"'))
    if not match:
        raise ValueError(f"not a duration: {duration!r}")
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def check_pod_security(kind, name, pod):
    where = f"{kind}/{name}"
    security = pod.get("securityContext", {})
    check(security.get("runAsNonRoot") is True, f"{where}: pod securityContext.runAsNonRoot must be true")
    check(
        security.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        f"{where}: pod seccompProfile must be RuntimeDefault",
    )
    check(pod.get("automountServiceAccountToken") is False, f"{where}: automountServiceAccountToken must be false")
    for container in pod.get("initContainers", []) + pod["containers"]:
        at = f"{where} container {container['name']}"
        sc = container.get("securityContext", {})
        check(sc.get("allowPrivilegeEscalation") is False, f"{at}: allowPrivilegeEscalation must be false")
        check(sc.get("readOnlyRootFilesystem") is True, f"{at}: readOnlyRootFilesystem must be true")
        check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{at}: capabilities must drop ALL")
        check(not sc.get("privileged"), f"{at}: must not be privileged")
        resources = container.get("resources", {})
        check({"cpu", "memory"} <= set(resources.get("requests", {})), f"{at}: needs cpu and memory requests")
        check("memory" in resources.get("limits", {}), f"{at}: needs a memory limit")
        check(container.get("imagePullPolicy") == "IfNotPresent", f"{at}: imagePullPolicy IfNotPresent")
        image = container["image"]
        check(":" in image and not image.endswith(":latest"), f"{at}: image {image!r} needs a fixed tag")
        for var in container.get("env", []):
            secretish = re.search(r"PASSWORD|TOKEN|SECRET|DATABASE_URL|NKEY", var["name"]) and not var["name"].endswith("_FILE")
            check(
                not (secretish and "value" in var),
                f"{at}: {var['name']} must come from a Secret (valueFrom), not a literal value",
            )


def main(deploy, rendered):
    deploy, rendered = Path(deploy), Path(rendered)
    for overlay in ("overlays-bundled-postgres", "overlays-managed-postgres"):
        docs = load(rendered / f"{overlay}.yaml")
        check(not by_kind(docs, "Secret"), f"{overlay}: a Secret is in the manifests; create it instead (create-secrets.sh)")
        for doc in docs:
            if doc["kind"] in ("Deployment", "StatefulSet"):
                check_pod_security(doc["kind"], doc["metadata"]["name"], doc["spec"]["template"]["spec"])
            if doc["kind"] == "Job":
                check_pod_security("Job", doc["metadata"]["name"], doc["spec"]["template"]["spec"])
        ns = by_kind(docs, "Namespace")
        check(
            len(ns) == 1 and ns[0]["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "restricted",
            f"{overlay}: the namespace must enforce Pod Security 'restricted'",
        )

        # The dispatcher's shutdown: readiness fails at once, the drain delay covers the time the
        # endpoints take to drop it, the grace covers the longest call, and the kubelet waits for
        # both.
        (deployment,) = by_kind(docs, "Deployment", "dispatcher")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = env_of(container)
        number = lambda key: int(env[key]["value"])  # noqa: E731
        drain, grace = number("DISPATCHER_DRAIN_DELAY_SECS"), number("DISPATCHER_SHUTDOWN_GRACE_SECS")
        readiness_grace = number("DISPATCHER_READINESS_GRACE_SECS")
        broker_grace = number("DISPATCHER_BROKER_GRACE_SECS")
        termination = pod["terminationGracePeriodSeconds"]
        check(
            grace >= LONGEST_CALL_SECS + 1,
            f"shutdown grace {grace} s must cover the longest call ({LONGEST_CALL_SECS} s) plus 1 s",
        )
        check(
            termination >= drain + grace + 5,
            f"terminationGracePeriodSeconds {termination} must be at least drain {drain} + grace {grace} + 5 s",
        )
        readiness = container["readinessProbe"]
        check(
            readiness["periodSeconds"] * readiness["failureThreshold"] < drain,
            f"the readiness probe ({readiness['periodSeconds']} s x {readiness['failureThreshold']}) must notice "
            f"draining within the drain delay ({drain} s)",
        )
        for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = container[probe_name]
            check(
                probe.get("timeoutSeconds", 1) < probe["periodSeconds"] or probe["periodSeconds"] <= 2,
                f"{probe_name}: timeoutSeconds must be below periodSeconds",
            )
        check(readiness["httpGet"]["path"] == "/readyz", "the readiness probe must ask /readyz")
        check(container["livenessProbe"]["httpGet"]["path"] == "/healthz", "the liveness probe must ask /healthz")
        check(
            readiness_grace >= 5,
            f"readiness grace {readiness_grace} s must ride out a blip of a few seconds",
        )
        check(
            broker_grace <= readiness_grace,
            f"broker grace {broker_grace} s: devices should leave a replica without NATS before it leaves the Service",
        )
        check(env["NATS_USER"].get("value") and "valueFrom" in env["NATS_PASSWORD"], "the dispatcher logs in to NATS")
        for pdb in by_kind(docs, "PodDisruptionBudget"):
            check(pdb["spec"].get("maxUnavailable") == 1, f"PDB {pdb['metadata']['name']}: maxUnavailable 1")
        check(len(by_kind(docs, "PodDisruptionBudget")) >= 2, "PDBs for the dispatcher and NATS")
        check(
            len(by_kind(docs, "HorizontalPodAutoscaler", "dispatcher")) == 1 and "replicas" not in deployment["spec"],
            "the HPA owns the dispatcher's replica count (no replicas in the Deployment)",
        )
        for workload in [deployment] + by_kind(docs, "StatefulSet", "nats"):
            check(
                len(workload["spec"]["template"]["spec"].get("topologySpreadConstraints", [])) >= 1,
                f"{workload['metadata']['name']}: topology spread",
            )

        # NATS: payload as large as the dispatcher's bodies; lame duck within the kubelet's wait.
        conf = (deploy / "k8s/base/nats.conf").read_text()
        payload = re.search(r"^max_payload:\s*(\d+)MB", conf, re.M)
        check(payload is not None, "nats.conf: max_payload in MB")
        if payload:
            check(
                int(payload.group(1)) * 1024 * 1024 >= number("DISPATCHER_MAX_BODY_BYTES"),
                "NATS max_payload must be at least the dispatcher's body limit",
            )
        lame = secs(re.search(r"^lame_duck_duration:\s*(\S+)", conf, re.M).group(1))
        lame_grace = secs(re.search(r"^lame_duck_grace_period:\s*(\S+)", conf, re.M).group(1))
        (nats,) = by_kind(docs, "StatefulSet", "nats")
        nats_termination = nats["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        check(
            nats_termination > lame + lame_grace,
            f"NATS terminationGracePeriodSeconds {nats_termination} must exceed lame duck {lame} + {lame_grace} s",
        )
        check("accounts" in conf and "$DISPATCHER_NATS_PASSWORD" in conf, "nats.conf: authentication from the environment")
        check(not re.search(r"password:\s*[^$\s]", conf), "nats.conf: no literal password")

        # Network policies: NATS and PostgreSQL reachable from dispatcher pods only.
        policies = {p["metadata"]["name"]: p for p in by_kind(docs, "NetworkPolicy")}
        check("default-deny-ingress" in policies, "a default-deny ingress NetworkPolicy")
        check("nats-ingress" in policies, "a NetworkPolicy for NATS")
        if overlay == "overlays-bundled-postgres":
            check("postgres-ingress" in policies, "a NetworkPolicy for PostgreSQL")
            (postgres,) = by_kind(docs, "StatefulSet", "postgres")
            (pg,) = postgres["spec"]["template"]["spec"]["containers"]
            pgdata = env_of(pg)["PGDATA"]["value"]
            mounts = [m["mountPath"] for m in pg["volumeMounts"] if m["name"] == "data"]
            check(
                mounts and pgdata.startswith(mounts[0].rstrip("/") + "/"),
                f"PGDATA {pgdata} must be a subdirectory of the volume {mounts}",
            )
            check(
                "pg_isready" in " ".join(pg["readinessProbe"]["exec"]["command"]),
                "PostgreSQL readiness by pg_isready",
            )

    # Proxies in front: longer than the longest call, bodies as large as the dispatcher's.
    examples = load(rendered / "examples.yaml")
    (ingress,) = by_kind(examples, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    check(int(annotations[prefix + "proxy-read-timeout"]) > LONGEST_CALL_SECS, "Ingress read timeout over the longest call")
    check(annotations[prefix + "proxy-buffering"] == "off", "Ingress: no buffering (SSE)")
    check(annotations[prefix + "proxy-body-size"] == "8m", "Ingress: body size of the dispatcher's limit")
    (route,) = by_kind(examples, "HTTPRoute")
    timeouts = [secs(rule["timeouts"]["request"]) for rule in route["spec"]["rules"]]
    check(0 in timeouts and max(timeouts) > LONGEST_CALL_SECS, "HTTPRoute: streams untimed, calls over the longest call")

    # Monitoring: the PrometheusRule is the rules file; the dashboard is JSON.
    monitoring = load(rendered / "monitoring.yaml")
    (rule,) = by_kind(monitoring, "PrometheusRule")
    rules_file = yaml.safe_load((deploy / "k8s/monitoring/alerts.rules.yml").read_text())
    check(rule["spec"]["groups"] == rules_file["groups"], "prometheusrule.yaml differs from alerts.rules.yml")
    check(len(by_kind(monitoring, "ServiceMonitor")) == 1, "a ServiceMonitor")
    (dashboard,) = by_kind(monitoring, "ConfigMap")
    parsed = json.loads(dashboard["data"]["dispatcher-dashboard.json"])
    check(parsed.get("panels"), "the dashboard has panels")

    for failure in failures:
        print(f"  - {failure}", file=sys.stderr)
    print(f"    {len(failures)} failure(s)" if failures else "    consistent")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
