"""Checks Kubernetes manifests against the "restricted" Pod Security Standard, without a cluster.

    check-pod-security.py FILE...          # exit 1 listing every violation
    check-pod-security.py --self-test FILE...

Implements the restricted profile's controls as the Kubernetes documentation lists them
(https://kubernetes.io/docs/concepts/security/pod-security-standards/), plus framecast's own
rules: a read-only root file system in every container, a startupProbe on the inference pods,
and a namespace that enforces the profile. `--self-test` breaks each rule in a copy of the
manifests and fails unless the checker notices every one, so a checker that passes everything
cannot pass here.
"""

import copy
import sys

import yaml

POD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}
ALLOWED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}
SECCOMP_OK = {"RuntimeDefault", "Localhost"}


def pod_spec(doc):
    spec = doc.get("spec", {})
    if doc["kind"] == "Pod":
        return spec
    if doc["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    return spec["template"]["spec"]


def check_pod(name, pod, problems):
    psc = pod.get("securityContext", {})
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            problems.append(f"{name}: {host} is set")
    for v in pod.get("volumes", []):
        kind = next(k for k in v if k != "name")
        if kind not in ALLOWED_VOLUMES:
            problems.append(f"{name}: volume '{v['name']}' is of type {kind}")
    containers = pod.get("initContainers", []) + pod.get("containers", [])
    for c in containers:
        where = f"{name}/{c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{where}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: adds capabilities {caps['add']}")
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            problems.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            problems.append(f"{where}: runs as user 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in SECCOMP_OK:
            problems.append(f"{where}: seccompProfile is {seccomp}, not RuntimeDefault or Localhost")
        if not sc.get("readOnlyRootFilesystem"):
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        for p in c.get("ports", []):
            if p.get("hostPort"):
                problems.append(f"{where}: hostPort {p['hostPort']}")


def check(docs):
    problems = []
    namespaces = {}
    for doc in docs:
        if doc["kind"] == "Namespace":
            namespaces[doc["metadata"]["name"]] = doc["metadata"].get("labels", {})
    for doc in docs:
        if doc["kind"] not in POD_KINDS:
            continue
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        pod = pod_spec(doc)
        check_pod(name, pod, problems)
        if doc["metadata"]["name"] == "framecast-inference" and not all(
            "startupProbe" in c for c in pod["containers"]
        ):
            problems.append(f"{name}: no startupProbe (models load before the port opens)")
        ns = doc["metadata"].get("namespace", "default")
        labels = namespaces.get(ns)
        if labels is None or labels.get("pod-security.kubernetes.io/enforce") != "restricted":
            problems.append(f"{name}: namespace '{ns}' does not enforce the restricted standard")
    return problems


def load(paths):
    docs = []
    for p in paths:
        with open(p) as f:
            docs.extend(d for d in yaml.safe_load_all(f) if d)
    return docs


def self_test(docs):
    """Breaks each rule once; every break must be reported."""
    def first_pod(ds):
        return next(pod_spec(d) for d in ds if d["kind"] in POD_KINDS)

    def container(ds):
        return first_pod(ds)["containers"][0]

    def inference(ds):
        return next(pod_spec(d) for d in ds if d["metadata"]["name"] == "framecast-inference"
                    and d["kind"] in POD_KINDS)["containers"][0]

    breaks = {
        "privilege escalation": lambda ds: container(ds)["securityContext"].pop("allowPrivilegeEscalation"),
        "capabilities": lambda ds: container(ds)["securityContext"]["capabilities"].update(drop=[]),
        "added capability": lambda ds: container(ds)["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "root": lambda ds: first_pod(ds)["securityContext"].update(runAsNonRoot=False),
        "uid 0": lambda ds: container(ds)["securityContext"].update(runAsUser=0),
        "seccomp": lambda ds: first_pod(ds)["securityContext"].pop("seccompProfile"),
        "privileged": lambda ds: container(ds)["securityContext"].update(privileged=True),
        "writable root": lambda ds: container(ds)["securityContext"].pop("readOnlyRootFilesystem"),
        "host network": lambda ds: first_pod(ds).update(hostNetwork=True),
        "host path": lambda ds: first_pod(ds).setdefault("volumes", []).append({"name": "h", "hostPath": {"path": "/"}}),
        "host port": lambda ds: container(ds)["ports"][0].update(hostPort=8001),
        "startup probe": lambda ds: inference(ds).pop("startupProbe"),
        "namespace label": lambda ds: next(d for d in ds if d["kind"] == "Namespace")["metadata"]["labels"].pop(
            "pod-security.kubernetes.io/enforce"),
    }
    missed = []
    for what, brk in breaks.items():
        broken = copy.deepcopy(docs)
        brk(broken)
        if not check(broken):
            missed.append(what)
    if missed:
        sys.exit("pod security self-test: the checker missed " + ", ".join(missed))
    print(f"pod security: self-test caught all {len(breaks)} rule breaks")


def main():
    args = sys.argv[1:]
    selftest = "--self-test" in args
    paths = [a for a in args if a != "--self-test"]
    docs = load(paths)
    problems = check(docs)
    if problems:
        sys.exit("pod security (restricted) violations:\n  " + "\n  ".join(problems))
    pods = sum(d["kind"] in POD_KINDS for d in docs)
    print(f"pod security: {pods} workloads meet the restricted standard")
    if selftest:
        self_test(docs)


if __name__ == "__main__":
    main()
