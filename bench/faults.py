"""faults: training steps/s of the reference model with no faults, and with one of 4 peers SIGKILLed every 10 s.

A local swarm (`dmoe_cli.swarm.LocalSwarm`: 4 peer processes, 8 experts of hidden 64, each on 2 peers) serves
the reference model (`models.CharTransformer`, 2 blocks, grid 8, top-2). Training runs without a
pause while the run alternates *no-fault* and *fault* segments of equal length (interleaved, twice over);
in a fault segment one peer is SIGKILLed at its start and every 10 s after, round robin, and restarted at once
(without a checkpoint dir it rejoins with a new port and peer id, so its old DHT record points at a dead address
until it expires). The router runs with `allow_zero_outputs=False`, so a token that no expert served fails its step.

Counted per segment: steps/s, failed steps (the forward or backward raised), dropped tokens (tokens that got
fewer than their k=2 expert answers in the forward; `masked_tokens` of the router), expert requests that failed
even after failover to the other replica, and backward requests that failed.
"""

from __future__ import annotations

import signal
import threading
import time

import torch

from bench.common import log


def run(ctx) -> dict:
    from dmoe_cli.swarm import LocalSwarm, SwarmConfig
    from models import CharTransformer, ModelConfig, load_corpus, sample_batch

    segment_s, pairs, kill_every = (5.0, 1, 3.0) if ctx.quick else (20.0, 2, 10.0)
    torch.set_num_threads(1)
    swarm_config = SwarmConfig(
        peers=4, experts_per_peer=4, replicas=2, hidden_dim=64, extra_peer_args=["--compute-threads", "1"]
    )
    data = load_corpus(None, 2_000_000)
    model_config = ModelConfig(grid_size=(8,), n_embd=64, n_layer=2, block_size=64)
    segments = []
    with LocalSwarm(swarm_config) as swarm:
        ctx.log(f"faults: swarm of 4 peers ready; {pairs} x (no-fault, fault) segments of {segment_s:.0f} s")
        torch.manual_seed(0)
        model = CharTransformer(
            model_config,
            router_kwargs=dict(
                initial_peers=swarm.initial_peers,
                k_min=1,
                forward_timeout=5.0,
                backward_timeout=5.0,
                timeout_after_k_min=1.0,
                allow_zero_outputs=False,
            ),
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        trainer = _Trainer(model, optimizer, lambda: sample_batch(data, 16, 64, generator))
        for _ in range(5):  # warm-up: routes known, channels open
            trainer.step()
        next_victim = 0
        for _pair in range(pairs):
            for kind in ("no faults", "faults"):
                killer = None
                if kind == "faults":
                    killer = _Killer(swarm, next_victim, kill_every, segment_s)
                    killer.start()
                segments.append(trainer.segment(kind, segment_s))
                if killer is not None:
                    killer.join()  # the last victim is back before the next segment starts
                    segments[-1]["kills"] = killer.kills
                    next_victim = killer.next_victim
                log(
                    f"faults: segment {len(segments)} ({kind}): {segments[-1]['steps_per_s']:.2f} steps/s, "
                    f"{segments[-1]['failed_steps']} failed steps, {segments[-1]['dropped_tokens']} dropped tokens"
                )
    summary = {}
    for kind in ("no faults", "faults"):
        picked = [s for s in segments if s["kind"] == kind]
        summary[kind] = {
            "steps_per_s": sorted(s["steps_per_s"] for s in picked)[len(picked) // 2] if picked else None,
            **{
                key: sum(s[key] for s in picked)
                for key in ("steps", "failed_steps", "dropped_tokens", "failed_requests", "backward_failures")
            },
            "kills": sum(s.get("kills", 0) for s in picked),
        }
    ratio = (summary["faults"]["steps_per_s"] or 0) / (summary["no faults"]["steps_per_s"] or float("nan"))
    faults = summary["faults"]
    return {
        "config": {
            "peers": 4,
            "experts": 8,
            "replicas": 2,
            "hidden": 64,
            "kill_every_s": kill_every,
            "segment_s": segment_s,
            "pairs": pairs,
            "batch": [16, 64],
            "client_threads": 1,
        },
        "segments": segments,
        "summary": summary,
        "ratio": ratio,
        "targets": [
            {
                "name": "failed steps with faults",
                "value": faults["failed_steps"],
                "target": "0",
                "met": faults["failed_steps"] == 0,
            },
            {
                "name": "dropped tokens with faults",
                "value": faults["dropped_tokens"],
                "target": "0",
                "met": faults["dropped_tokens"] == 0,
            },
            {"name": "steps/s with faults / without", "value": ratio, "target": ">= 0.7", "met": ratio >= 0.7},
        ],
    }


class _Trainer:
    """The flat training loop of `dmoe_cli.training.train`, counting what each segment costs."""

    COUNTERS = ("failed_requests", "masked_tokens", "backward_failures")

    def __init__(self, model, optimizer, next_batch):
        self.model, self.optimizer, self.next_batch = model, optimizer, next_batch

    def step(self) -> bool:
        x, y = self.next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            _, loss = self.model(x, y)
            loss.backward()
        except Exception as exc:  # the step fails, as `dmoe train` would skip it
            log(f"faults: a step failed: {exc!r}"[:300])
            return False
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return True

    def _counters(self) -> dict[str, int]:
        totals = dict.fromkeys(self.COUNTERS, 0)
        for layer in self.model.ffn_layers:
            for key in self.COUNTERS:
                totals[key] += int(layer.stats.get(key, 0))
        return totals

    def segment(self, kind: str, seconds: float) -> dict:
        before = self._counters()
        steps = failed = 0
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            if self.step():
                steps += 1
            else:
                failed += 1
        elapsed = time.monotonic() - started
        after = self._counters()
        delta = {key: after[key] - before[key] for key in self.COUNTERS}
        return {
            "kind": kind,
            "seconds": elapsed,
            "steps": steps,
            "steps_per_s": steps / elapsed,
            "failed_steps": failed,
            "dropped_tokens": delta["masked_tokens"],
            "failed_requests": delta["failed_requests"],
            "backward_failures": delta["backward_failures"],
        }


class _Killer(threading.Thread):
    """SIGKILLs one peer every `every` seconds for `duration` seconds, round robin, restarting each at once."""

    def __init__(self, swarm, first_victim: int, every: float, duration: float):
        super().__init__(daemon=True)
        self.swarm, self.next_victim, self.every, self.duration = swarm, first_victim, every, duration
        self.kills = 0

    def run(self) -> None:
        started = time.monotonic()
        while time.monotonic() - started < self.duration:
            kill_at = time.monotonic()
            victim = self.next_victim
            self.swarm.kill_peer(victim, signal.SIGKILL)
            self.kills += 1
            self.next_victim = (victim + 1) % self.swarm.config.peers
            try:
                self.swarm.restart_peer(victim)
            except Exception as exc:  # reported; the next kill still waits for its turn
                log(f"faults: restarting peer {victim} failed: {exc}")
            remaining = kill_at + self.every - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)
            if time.monotonic() - started + 0.5 >= self.duration:
                break


def table(result: dict) -> tuple[list[str], list[list]]:
    headers = [
        "segment",
        "kind",
        "seconds",
        "steps",
        "steps/s",
        "kills",
        "failed steps",
        "dropped tokens",
        "failed requests",
        "backward failures",
    ]
    rows = [
        [
            i + 1,
            s["kind"],
            s["seconds"],
            s["steps"],
            s["steps_per_s"],
            s.get("kills", 0),
            s["failed_steps"],
            s["dropped_tokens"],
            s["failed_requests"],
            s["backward_failures"],
        ]
        for i, s in enumerate(result["segments"])
    ]
    return headers, rows
