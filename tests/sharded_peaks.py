"""Run by tests/test_benchmark.py under torchrun (gloo, CPU): the memory estimate's passes on the
real random:tiny-llama sharded over the ranks as --shard shards it, each measured by the
estimate's tracker on real tensors and real kernels. Rank 0 writes {figure: peak bytes}.

    torchrun --nproc-per-node 2 tests/sharded_peaks.py OUT.json '{"batch_size": 2, ...}'
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.bench import estimate  # noqa: E402
from src.distributed import ranks as distributed  # noqa: E402
from src.models.loader import load_model  # noqa: E402


def main(out: str, settings: str) -> None:
    args = SimpleNamespace(**json.loads(settings))
    ranks = distributed.join("cpu", shard=True)
    model = load_model("random:tiny-llama", dtype="float32", device="cpu", shard_over=ranks)[0]
    model.eval()
    figures = estimate.passes(model, args, args.metrics.split(","), ranks)
    peaks = {name: estimate.peak_bytes(model, run)[0] for name, (run, _, _) in figures.items()}
    if ranks.is_main:
        Path(out).write_text(json.dumps(peaks))
    distributed.leave()


if __name__ == "__main__":
    main(*sys.argv[1:])
