#!/usr/bin/env bash
# Start one node's share of a multi-node `accelerate launch`. Run it in every pod of a Kubeflow PyTorchJob
# (Master and Workers run the same command):
#
#   launch/multinode.sh launch/zero2.yaml ctld/train.py configs/base.yaml --train.stage=vae --train.resume=latest
#
# It reads what the PyTorchJob operator puts in each pod:
#   PET_NNODES      number of nodes (pods)                     e.g. 2
#   PET_NODE_RANK   this node's rank: Master 0, Worker i = i+1  e.g. 1
#   MASTER_ADDR     the Master pod's service name              e.g. ctld-vae-master-0
#   MASTER_PORT     the port named `pytorchjob-port`           e.g. 23456
# and GPUS_PER_NODE (default: the GPUs this pod sees, from nvidia-smi or torch.cuda.device_count()).
# The operator's WORLD_SIZE and RANK count NODES, not processes, so they are ignored here: accelerate's
# --num_processes is the total over all nodes (PET_NNODES x GPUS_PER_NODE).
#
# A missing or malformed variable is an error (exit 2, message naming it): a silent fallback to localhost
# would start N independent single-node trainings that overwrite each other's checkpoints.
#
# CPU mode (tests, laptops): CTLD_CPU=1 or `use_cpu: true` in the accelerate config. Processes per node
# then default to 1; DDP configs run over gloo (ACCELERATE_USE_CPU=1) and DeepSpeed configs on
# DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu; ACCELERATE_USE_CPU would silently drop DeepSpeed).
#
# Other knobs: PYTHON (interpreter with accelerate, default python3), CTLD_DNS_TIMEOUT (seconds a Worker
# waits for MASTER_ADDR to resolve, default 600), TORCH_ELASTIC_SHUTDOWN_TIMEOUT (seconds the launcher
# waits after forwarding SIGTERM before it SIGKILLs the training processes, default 300; keep it below
# the pod's terminationGracePeriodSeconds so the SIGTERM checkpoint can finish).
set -euo pipefail

die() {
    echo "launch/multinode.sh: error: $*" >&2
    exit 2
}

if [[ $# -lt 2 ]]; then
    die "usage: launch/multinode.sh ACCELERATE_CONFIG TRAINING_SCRIPT [SCRIPT_ARGS...]"
fi
config_file=$1
shift
[[ -f $config_file ]] || die "accelerate config '$config_file' not found (cwd: $PWD); pass a file from launch/"

require_int() {  # require_int NAME MIN HINT: the variable is set and an integer >= MIN
    local name=$1 min=$2 hint=$3 value
    value=${!name-}
    [[ -n $value ]] || die "$name is not set; $hint"
    [[ $value =~ ^[0-9]+$ ]] || die "$name='$value' is not a whole number; $hint"
    ((10#$value >= min)) || die "$name=$value must be >= $min; $hint"
}

operator_hint="the PyTorchJob operator sets it in every pod; outside Kubernetes export it yourself"
require_int PET_NNODES 1 "$operator_hint (elastic 'min:max' ranges are not supported)"
require_int PET_NODE_RANK 0 "$operator_hint (Master 0, Worker i = i+1)"
[[ -n ${MASTER_ADDR-} ]] || die "MASTER_ADDR is not set; $operator_hint (never defaulted to localhost)"
require_int MASTER_PORT 1 "$operator_hint (the container port named pytorchjob-port)"
nnodes=$((10#$PET_NNODES))
node_rank=$((10#$PET_NODE_RANK))
((node_rank < nnodes)) || die "PET_NODE_RANK=$node_rank must be below PET_NNODES=$nnodes"
((10#$MASTER_PORT <= 65535)) || die "MASTER_PORT=$MASTER_PORT is not a TCP port"

python=${PYTHON:-python3}
command -v "$python" >/dev/null || die "python interpreter '$python' not found; set PYTHON"

# What the config asks for: distributed_type, use_cpu and the DeepSpeed JSON (read with accelerate's own
# YAML loader's library, so quoting rules match).
read -r distributed_type config_use_cpu ds_json < <(
    "$python" - "$config_file" <<'EOF'
import sys

import yaml

with open(sys.argv[1]) as f:
    cfg = yaml.safe_load(f) or {}
ds_json = (cfg.get("deepspeed_config") or {}).get("deepspeed_config_file") or "-"
print(str(cfg.get("distributed_type", "NO")).upper(), int(bool(cfg.get("use_cpu", False))), ds_json)
EOF
) || die "could not read accelerate config '$config_file'"

use_deepspeed=0
case $distributed_type in
    DEEPSPEED)
        use_deepspeed=1
        if [[ $ds_json != - && ! -f $ds_json ]]; then
            die "DeepSpeed JSON '$ds_json' named in $config_file not found (cwd: $PWD); run from the repository root"
        fi
        ;;
    MULTI_GPU) ;;
    *) die "$config_file has distributed_type $distributed_type; multi-node needs MULTI_GPU or DEEPSPEED \
(launch/multi_gpu.yaml, launch/zero2.yaml, launch/zero3.yaml; launch/cpu_ddp.yaml on CPU)" ;;
esac

cpu_mode=0
if [[ ${CTLD_CPU:-0} == 1 || $config_use_cpu == 1 ]]; then
    cpu_mode=1
fi

if [[ -n ${GPUS_PER_NODE-} ]]; then
    require_int GPUS_PER_NODE 1 "processes (GPUs) per node"
    procs_per_node=$((10#$GPUS_PER_NODE))
elif ((cpu_mode)); then
    procs_per_node=1
else
    procs_per_node=0
    if command -v nvidia-smi >/dev/null; then
        procs_per_node=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    fi
    if ((procs_per_node == 0)); then
        procs_per_node=$("$python" -c 'import torch; print(torch.cuda.device_count())')
    fi
    ((procs_per_node > 0)) || die "no GPU visible in this pod and GPUS_PER_NODE is not set; request \
nvidia.com/gpu in the pod spec, or set CTLD_CPU=1 with launch/cpu_ddp.yaml for a CPU run"
fi
num_processes=$((nnodes * procs_per_node))
if ((num_processes < 2)) && ((!use_deepspeed)); then
    die "$nnodes node(s) x $procs_per_node process(es) is a single process; use launch/single_gpu.yaml \
with plain 'accelerate launch' instead"
fi

if ((cpu_mode)); then
    if ((use_deepspeed)); then
        export DS_ACCELERATOR=cpu
        unset ACCELERATE_USE_CPU
    else
        # Without this a MULTI_GPU config on CPU starts the processes but leaves them unconnected
        # (distributed_type NO: reductions silently do nothing).
        export ACCELERATE_USE_CPU=1
    fi
fi

# Workers can start before the Master's Service has a DNS record; torch's rendezvous would then fail
# after its own timeout with an unhelpful error, so wait here with a clear one.
if ((node_rank != 0)); then
    dns_timeout=${CTLD_DNS_TIMEOUT:-600}
    waited=0
    until getent hosts "$MASTER_ADDR" >/dev/null; do
        ((waited < dns_timeout)) || die "MASTER_ADDR=$MASTER_ADDR did not resolve within ${dns_timeout}s \
(CTLD_DNS_TIMEOUT); is the Master pod running and its Service created?"
        sleep 2
        waited=$((waited + 2))
    done
fi

export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

args=(
    --config_file "$config_file"
    --num_machines "$nnodes"
    --machine_rank "$node_rank"
    --num_processes "$num_processes"
    --main_process_ip "$MASTER_ADDR"
    --main_process_port "$MASTER_PORT"
    # Static rendezvous at MASTER_ADDR:MASTER_PORT (torchrun --master_addr/--master_port), the address
    # the operator gives every pod, rather than a c10d rendezvous endpoint.
    --rdzv_backend static
    --same_network
)
if ((use_deepspeed)); then
    # DeepSpeed's default multi-node launcher ssh-es into the other nodes with pdsh; in a PyTorchJob every
    # pod starts its own processes, which is the "standard" (torchrun) launcher.
    args+=(--deepspeed_multinode_launcher standard)
fi

echo "launch/multinode.sh: node $node_rank/$nnodes, $procs_per_node process(es) per node, $num_processes in all, \
master $MASTER_ADDR:$MASTER_PORT, $distributed_type$( ((cpu_mode)) && echo ' on CPU')" >&2
# Exit code of this pod (k8s/README.md, restartPolicy ExitCode): 0 finished; 143 preempted (this pod got SIGTERM,
# or the training processes stopped with their SIGTERM checkpoint because another pod got it), restarted and
# resumed; anything else as accelerate returns it (1: a failure that a restart would repeat). torchrun exits 1
# whatever its workers' codes were, so ctld/train.py touches $CTLD_PREEMPTED_FILE when it stops preempted.
preempted_exit_code=143
marker_dir=$(mktemp -d)
export CTLD_PREEMPTED_FILE=$marker_dir/preempted
child=
signalled=0
forward() {  # the pod's SIGTERM (or Ctrl-C) goes on to accelerate (torchrun's agent), which forwards it to every
    signalled=1  # training process so they can save a checkpoint
    [[ -n $child ]] && kill -s "$1" "$child" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT
"$python" -m accelerate.commands.launch "${args[@]}" "$@" &
child=$!
status=0
while true; do
    wait "$child" && status=0 || status=$?
    kill -0 "$child" 2>/dev/null || break  # `wait` also returns when a trapped signal arrives
done
preempted=0
[[ -f $CTLD_PREEMPTED_FILE ]] && preempted=1
rm -rf "$marker_dir"
if ((signalled || preempted)) && ((status != 0)); then
    echo "launch/multinode.sh: preempted (training stopped with a checkpoint); exit $preempted_exit_code so the \
PyTorchJob restarts this pod and it resumes from the last checkpoint" >&2
    exit "$preempted_exit_code"
fi
exit "$status"
