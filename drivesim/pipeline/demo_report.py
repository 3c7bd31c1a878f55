"""The demo's additions to the report page: how the numbers were produced (stages, budgets, timings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drivesim.atomic import write_bytes_atomic
from drivesim.pipeline.demo_state import STEPS, TRAIN_STEPS


def add_demo_section(html_path: Path, run: dict[str, Any]) -> None:
    """Insert a "How these numbers were produced" section (preset, budgets, steps, timings) below the title of
    the report page, rewriting it atomically."""
    import html as _html

    e = _html.escape
    rows = []
    for name in STEPS:
        st = run["stages"].get(name, {})
        secs = st.get("seconds")
        what = ""
        if name in ("autoencoder", "image_ldm") and st.get("weights") == "pretrained":
            what = (f"pretrained {name.replace('_', ' ')} shipped with drivesim ({st.get('pretrained')}, "
                    f"{st.get('steps')} steps, batch {st.get('batch_size')}; its model card says how it was made)")
        elif name in TRAIN_STEPS and "steps" in st:
            budget = st.get("budget_minutes")
            what = (f"{st['steps']} steps ({st.get('stop_reason')}; budget "
                    f"{f'{budget:g} min' if budget else str(st.get('max_steps')) + ' steps'}, batch "
                    f"{st.get('batch_size')}), {st.get('steps_per_s')} steps/s, final loss {st.get('final_loss')}, "
                    f"{st.get('weights')} weights")
        elif name == "encode" and "clips" in st:
            what = f"{st['clips']} clips encoded (posterior mean), scale factor {st.get('scale_factor')}"
        elif name == "scenarios" and "day" in st:
            what = "; ".join(f"{k}: {len(st[k]['clips'])} {st[k]['split']} clip(s) chained" for k in ("day", "night"))
        elif name == "report":
            what = "this page"
        elif name == "rollout" and "num_frames" in st:
            what = (f"2 rollouts (day, night) of {st['num_frames']} frames at {st['fps']:g} fps, "
                    f"{st.get('steps') or 'default (preset)'} sampler steps, context guidance "
                    f"{st.get('context_guidance')}, context perturbation level {st.get('context_noise_level')}; "
                    f"day {st.get('day', {}).get('seconds')} s, night {st.get('night', {}).get('seconds')} s")
        elif name == "eval":
            what = st["skipped"] if st.get("skipped") else f"N = {st.get('n')} windows of 16 frames per side"
        if st.get("resumed"):
            what += f"{'; ' if what else ''}{st['resumed']}"
        if st.get("torch_threads"):
            what += f"{'; ' if what else ''}{st['torch_threads']} torch thread(s)"
        rows.append(f"<tr><td>{e(name)}</td><td style='text-align:right'>"
                    f"{'-' if secs is None else f'{secs / 60:.1f} min'}</td><td>{e(what)}"
                    "</td></tr>")
    total = sum(st.get("seconds") or 0 for st in run["stages"].values())
    section = (
        "<section id='demo-run'><h2>How these numbers were produced</h2>"
        f"<p><b>drivesim demo</b>, preset <b>{e(run['preset'])}</b> on <span class='mono'>{e(run['data'])}</span>, "
        f"seed {run['seed']}; machine: {run['machine']['cpus']} CPU core(s), torch threads "
        f"{run['machine']['torch_threads']}, CUDA {'yes' if run['machine']['cuda'] else 'no'}. "
        f"Total wall time of the stages: {total / 60:.1f} min.</p>"
        f"<p class='caveat'>{e(run['note'])}</p>"
        "<table><tr><th>stage</th><th>wall time</th><th>what ran</th></tr>" + "".join(rows) + "</table></section>")
    insert_section(html_path, section)


def insert_section(html_path: Path, section: str) -> None:
    """Insert an HTML section before the first <h2> of the page (below the title), rewriting it atomically."""
    page = html_path.read_text(encoding="utf-8")
    marker = page.find("<h2")
    page = page[:marker] + section + page[marker:] if marker >= 0 else page.replace("</body>", section + "</body>")
    write_bytes_atomic(html_path, page.encode("utf-8"))
