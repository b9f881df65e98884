#!/usr/bin/python3
"""Parses the deploy files and checks they agree with amoeba-server's flags (no Docker here).

Usage: deploy_lint_test.py REPO_ROOT SERVER_BINARY
"""
import re
import subprocess
import sys

import yaml  # Debian's python3-yaml

root, server = sys.argv[1:3]
failed = []
passed = 0


def check(cond, what):
    global passed
    if cond:
        passed += 1
    else:
        failed.append(what)


help_text = subprocess.run([server, "--help"], capture_output=True, text=True).stdout
server_envs = set(re.findall(r"\(Env:(AMOEBA_[A-Z_]+)\)", help_text))
check(len(server_envs) > 10, f"amoeba-server --help lists env twins ({len(server_envs)})")

docs = {}
for name in ["deployment", "service", "hpa", "pvc"]:
    with open(f"{root}/deploy/k8s/{name}.yaml") as f:
        docs[name] = [d for d in yaml.safe_load_all(f) if d]
    check(all("apiVersion" in d and "kind" in d and "metadata" in d for d in docs[name]), f"{name}: k8s objects")

dep = docs["deployment"][0]
pod = dep["spec"]["template"]["spec"]
c = pod["containers"][0]
envs = {e["name"] for e in c["env"]}
check(envs <= server_envs, f"deployment env vars unknown to the server: {envs - server_envs}")
ports = {p["containerPort"] for p in c["ports"]}
env_val = {e["name"]: e.get("value") for e in c["env"]}
check(int(env_val["AMOEBA_PORT"]) in ports and int(env_val["AMOEBA_METRICS_PORT"]) in ports
      and int(env_val["AMOEBA_HTTP_PORT"]) in ports, "ports match env")
for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
    check(c[probe]["grpc"]["port"] == int(env_val["AMOEBA_PORT"]), f"{probe} uses gRPC health on the server port")
check(pod["terminationGracePeriodSeconds"] > float(env_val["AMOEBA_DRAIN_SECONDS"]), "grace period covers the drain")
check(dep["spec"]["selector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"], "selector matches")
svcs = {d["metadata"]["name"]: d for d in docs["service"]}
check(svcs["amoeba-server-headless"]["spec"]["clusterIP"] == "None", "headless service")
check(docs["hpa"][0]["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], "HPA targets the deployment")
claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
check(claim == docs["pvc"][0]["metadata"]["name"], "deployment mounts the PVC")

with open(f"{root}/deploy/docker-compose.yml") as f:
    compose = yaml.safe_load(f)
check(set(compose["services"]["amoeba"]["environment"]) <= server_envs, "compose env vars known to the server")
with open(f"{root}/deploy/Dockerfile") as f:
    dockerfile = f.read()
check("scripts/setup" in dockerfile, "Dockerfile builds through scripts/setup")
check("HEALTHCHECK" in dockerfile and "health" in dockerfile, "Dockerfile HEALTHCHECK uses gRPC health")
check(re.search(r"^USER (?!root)", dockerfile, re.M) is not None, "Dockerfile runs as non-root")
# The server's variables, the SentencePiece module path, and scripts/setup's own switches.
with open(f"{root}/scripts/setup") as f:
    setup_envs = set(re.findall(r"\$\{(AMOEBA_[A-Z_]+)", f.read()))
for env in re.findall(r"(AMOEBA_[A-Z_]+)=", dockerfile):
    check(env in server_envs or env == "AMOEBA_SP_MODULE" or env in setup_envs,
          f"Dockerfile env {env} known")

for f in failed:
    print("FAIL:", f)
print(f"deploy_lint: {passed} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
