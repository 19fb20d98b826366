"""Offline circuitsvis views of one fact: its knowledge synapses and its KNs along the prompt.

    python experiments/views.py                          # SmolLM2, the Eiffel Tower -> Paris
    python experiments/views.py --prompt "The capital of France is" --answer Paris

Writes ``results/views/views_<model>.html`` (standalone, ~1.3 MB: the circuitsvis bundle
inlined, renders without internet; not committed) and, when Chromium is installed, a headless
screenshot ``figures/views_<model>.png`` (the one in README). The views
(:func:`kn_lens.viz.fact_views`):
1. the attention of the layer with the most knowledge synapses off the attention sink (key 0;
   QL eq. 5-6, alpha = 0.3), synapse columns only;
2. the same layer's full attention pattern;
3. the fact's top-5 knowledge neurons by contribution (FiNE eq. 3), their activation at every
   prompt position (one selectable series per neuron).
"""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    ap.add_argument("--answer", default="Paris")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "views")
    ap.add_argument("--figures-dir", type=Path, default=ROOT / "figures")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default 0: torch's own)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when visible)")
    ap.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    args = ap.parse_args()

    import torch

    from kn_lens import contribution_scores, load_model, query_from_prompt, viz
    from kn_lens.errors import ToolUnavailableError
    from kn_lens.neurons import top_k
    from kn_lens.viz.browser import find_chromium, screenshot

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    q = query_from_prompt(model, args.prompt, args.answer)
    kns = top_k(contribution_scores(model, q), 5)  # the top-5 by contribution
    views = viz.fact_views(model, q, kns, label=f"'{args.prompt}' -> '{args.answer}', "
                           f"{args.model}", full_attention=True)
    page = viz.save_html(views, args.out / f"views_{args.model}.html",
                         title=f"kn-lens views: {args.prompt}")
    print(f"views: {page} ({page.stat().st_size / 1e6:.1f} MB, offline); "
          f"KNs {sorted(str(n) for n in kns)}")
    if find_chromium() is None:
        print("no Chromium: screenshot skipped (Debian: apt-get install chromium)")
        return
    try:
        png = screenshot(page, args.figures_dir / f"views_{args.model}.png", width=900, height=1250)
    except ToolUnavailableError as exc:
        raise SystemExit(f"screenshot failed: {exc}")
    print(f"screenshot: {png}")


if __name__ == "__main__":
    main()
