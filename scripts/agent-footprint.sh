#!/usr/bin/env bash
# Memory of one `fleetpatch agent run` against a real gateway: a `fleetpatch dev` API
# server and a `fleetpatch controller` (both FULL, the default build), the agent (AGENT,
# say the agent build) registered with a bootstrap token. Prints VmRSS after IDLE
# seconds of heartbeats and long polls, then the peak (VmRSS sampled every 100 ms, and
# VmHWM) while a job runs a script that prints 20,000 lines. SMAPS=1 adds the idle
# RSS per mapping. Needs kubectl.
#   scripts/agent-footprint.sh target/release/fleetpatch target/agent/fleetpatch [IDLE_SECONDS]
set -euo pipefail
full="$1"; agent="$2"; idle="${3:-30}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
export KUBECONFIG="$work/kubeconfig" RUST_LOG="${RUST_LOG:-warn}"

# wait_line FILE TEXT: until TEXT shows up in FILE (30 s at most).
wait_line() {
    for _ in $(seq 1 300); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "timed out waiting for $2 in $1" >&2
    cat "$1" >&2
    exit 1
}
# field PID NAME: a field of /proc/PID/status, in kB for the Vm*/Rss* ones.
field() { awk -v f="$2" '$1 == f {print $2}' "/proc/$1/status"; }

"$full" dev --listen 127.0.0.1:0 --kubeconfig "$KUBECONFIG" >"$work/dev.log" 2>&1 &
pids+=($!)
wait_line "$work/dev.log" "listening on"
kubectl apply -f "$repo/crds" >/dev/null
kubectl create namespace fleetpatch-system >/dev/null
kubectl apply -f - >/dev/null <<'YAML'
apiVersion: v1
kind: Secret
metadata: {name: join, namespace: fleetpatch-system}
type: fleetpatch.io/bootstrap-token
stringData: {token: measure, usage: multi, plan-namespaces: default}
---
apiVersion: fleetpatch.io/v1alpha1
kind: Script
metadata: {name: work}
spec:
  language: Bash
  content: |
    for i in $(seq 1 20000); do echo "line $i of some output a patch script might print"; done
    sleep 8
    echo done
---
apiVersion: fleetpatch.io/v1alpha1
kind: Task
metadata: {name: work}
spec: {os: Linux, type: RunScript, runScript: {scriptRef: {name: work}}}
---
apiVersion: fleetpatch.io/v1alpha1
kind: Workflow
metadata: {name: work}
spec: {os: Linux, preTasks: [{taskRef: {name: work}}]}
---
apiVersion: fleetpatch.io/v1alpha1
kind: RemediationPlan
metadata: {name: work}
spec:
  targets: [{name: all, os: Linux, selector: {matchLabels: {measure: 'yes'}}, workflowRef: {name: work}}]
  patches: {skip: true}
  rollout: {maxConcurrent: 1}
YAML
"$full" controller --namespace fleetpatch-system --gateway-listen 127.0.0.1:0 \
    --metrics-listen 127.0.0.1:0 >"$work/controller.log" 2>&1 &
pids+=($!)
wait_line "$work/controller.log" "gateway listening on"
gateway="$(grep -o 'gateway listening on [^ ]*' "$work/controller.log" | head -1 | awk '{print $4}')"
echo measure >"$work/token"
"$agent" agent run --server "$gateway" --token-file "$work/token" --name host-1 \
    --label measure=yes --state-dir "$work/state" --simulate-reboot >"$work/agent.log" 2>&1 &
agent_pid=$!
pids+=("$agent_pid")
for _ in $(seq 1 100); do kubectl get agent host-1 >/dev/null 2>&1 && break; sleep 0.2; done
sleep "$idle"
echo "agent: $(stat -c %s "$agent") bytes, $(readlink -f "$agent")"
echo "idle after ${idle}s: VmRSS $(field "$agent_pid" VmRSS:) kB (anon $(field "$agent_pid" RssAnon:), file $(field "$agent_pid" RssFile:)), VmHWM $(field "$agent_pid" VmHWM:) kB, threads $(field "$agent_pid" Threads:)"
if [ -n "${SMAPS:-}" ]; then
    awk '/^[0-9a-f]+-[0-9a-f]+ / {name=$6; if (name=="") name="[anon]"} /^Rss:/ {rss[name]+=$2} END {for (n in rss) if (rss[n] > 0) print rss[n], n}' "/proc/$agent_pid/smaps" | sort -n | tail -8
fi
"$full" run plan work -n default >/dev/null
peak=0
for _ in $(seq 1 600); do
    rss="$(field "$agent_pid" VmRSS:)"; [ "$rss" -gt "$peak" ] && peak="$rss"
    phase="$(kubectl get patchjobs -o jsonpath='{.items[0].status.phase}' 2>/dev/null || true)"
    case "$phase" in Succeeded|Failed|Unknown) break ;; esac
    sleep 0.1
done
echo "job: ${phase:-none}; while running: peak sampled VmRSS $peak kB, VmHWM $(field "$agent_pid" VmHWM:) kB"
sleep 5
echo "idle again after 5s: VmRSS $(field "$agent_pid" VmRSS:) kB"
