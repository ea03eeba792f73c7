"""What the Ray cluster costs and gives (backend/cluster.py), on the demo models, on this machine.

    python tools/bench_ray.py                      # 128x128, 20 steps, 8 sequential jobs, bursts of 4
    python tools/bench_ray.py --size 64 --steps 6  # smaller jobs: the overhead weighs more

A local Ray instance with this machine's cores. Prints, for docs/SCALING.md:
- dispatch overhead per job: the front end's time for a job (dispatched -> its last event delivered, its
  images saved) minus the worker Engine's own (submitted -> last event), over sequential jobs on 1 worker;
- overhead per event: worker sent -> front end delivered (same machine: one clock), every event of those jobs;
- Stop: from job.cancel() to the Cancelled event delivered (its partial image saved), in process and on
  1 worker;
- a burst of --burst jobs sent at once: wall time and CPU time (every worker process + the front end), in
  process (the Engine of backend/engine.py), on 1 worker (all cores) and on 2 workers (half the cores each).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.engine import Engine, EngineConfig  # noqa: E402
from backend.events import Cancelled, Result, Step  # noqa: E402
from backend.fields import new_owner  # noqa: E402
from backend.requests import Text2ImageRequest  # noqa: E402

MODEL = "kandinsky-2-2-demo"


def requests(count: int, size: int, steps: int, first_seed: int = 0) -> list:
    return [Text2ImageRequest(model=MODEL, prompt=f"a red fox {i}", width=size, height=size, num_inference_steps=steps,
                              prior_num_inference_steps=max(1, steps // 2), seed=first_seed + i) for i in range(count)]


def run_all(engine, batch: list) -> float:
    """Send `batch` at once (one owner per job, so no per-owner limit applies); wall seconds until all ended."""
    started = time.perf_counter()
    jobs = [engine.submit(request, new_owner()) for request in batch]
    for job in jobs:
        end = job.wait(timeout=600)
        assert isinstance(end, Result), end
    return time.perf_counter() - started


def stop_text(latencies: list[float]) -> str:
    return (f"Stop -> Cancelled: median {1000 * statistics.median(latencies):.0f} ms, max {1000 * max(latencies):.0f} ms "
            f"over {len(latencies)} stops")


def burst(engine, batch: list, workers=()) -> tuple[float, float]:
    """(wall s, CPU s) of a burst; CPU: this process plus each worker process."""
    def cpu() -> float:
        if not workers:  # (ray.get would start a Ray instance)
            return time.process_time()
        import ray

        return time.process_time() + sum(ray.get([w.handle.cpu_seconds.remote() for w in workers]))
    before = cpu()
    wall = run_all(engine, batch)
    return wall, cpu() - before


def stop_latencies(engine, size: int, stops: int) -> list[float]:
    """Seconds from Stop (job.cancel) to the job's Cancelled event delivered, a few times, each stop
    made at the job's 5th denoising step."""
    latencies = []
    for seed in range(stops):
        job = engine.submit(requests(1, size, 200, first_seed=seed)[0], new_owner())
        events = job.events(timeout=120)
        for event in events:
            if isinstance(event, Step) and event.phase == "denoise" and event.step >= 5:
                break
        events.close()
        job.cancel()
        end = job.wait(timeout=60)
        assert isinstance(end, Cancelled), end
        latencies.append(end.latency_s)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sequential", type=int, default=8, help="jobs one after another, for the overheads")
    parser.add_argument("--burst", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--stops", type=int, default=5, help="Stops timed in process and on 1 worker")
    args = parser.parse_args()

    import ray

    from backend.cluster import ClusterEngine
    from backend.ray_setup import runtime_env

    outputs = Path("/tmp/bench-ray-outputs")
    config = EngineConfig(demo=True, outputs_dir=str(outputs))
    batch = requests(args.burst, args.size, args.steps, first_seed=100)
    print(f"demo {MODEL}, {args.size}x{args.size}, {args.steps} decoder steps; {args.cpus} cores; "
          f"burst of {args.burst} jobs")

    engine = Engine(config)
    run_all(engine, requests(1, args.size, args.steps))  # loads the models
    wall, cpu = burst(engine, batch)
    print(f"in process (1 Engine, all cores): burst wall {wall:.2f} s, CPU {cpu:.2f} s")
    print(stop_text(stop_latencies(engine, args.size, args.stops)))
    engine.shutdown()

    ray.init(num_cpus=args.cpus, include_dashboard=False, runtime_env=runtime_env(), logging_level="WARNING")
    for workers in (1, 2):
        started = time.perf_counter()
        cluster = ClusterEngine(config, cpu_workers_per_node=workers)
        print(f"\n{workers} worker(s), {args.cpus // workers} core(s) each: started in "
              f"{time.perf_counter() - started:.1f} s")
        run_all(cluster, requests(workers, args.size, args.steps))  # each worker loads the models
        if workers == 1:
            cluster.timings.clear()
            cluster.event_delays.clear()
            for request in requests(args.sequential, args.size, args.steps, first_seed=10):
                run_all(cluster, [request])
            per_job = [1000 * (t["front_s"] - t["engine_s"]) for t in cluster.timings]
            per_event = [1000 * d for d in cluster.event_delays]
            engine_s = statistics.mean(t["engine_s"] for t in cluster.timings)
            print(f"dispatch overhead per job: median {statistics.median(per_job):.1f} ms, mean "
                  f"{statistics.mean(per_job):.1f} ms, max {max(per_job):.1f} ms over {len(per_job)} jobs "
                  f"(a job takes {engine_s:.2f} s on the worker)")
            print(f"overhead per event: median {statistics.median(per_event):.2f} ms, mean "
                  f"{statistics.mean(per_event):.2f} ms, p95 {sorted(per_event)[int(0.95 * len(per_event))]:.2f} ms "
                  f"over {len(per_event)} events")
            print(stop_text(stop_latencies(cluster, args.size, args.stops)))
        wall, cpu = burst(cluster, batch, cluster.workers)
        spread = sorted(t["worker"] for t in list(cluster.timings)[-args.burst:])
        print(f"burst wall {wall:.2f} s, CPU {cpu:.2f} s (jobs per worker: "
              f"{', '.join(f'{name} {spread.count(name)}' for name in dict.fromkeys(spread))})")
        cluster.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
