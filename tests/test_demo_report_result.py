"""train/demo_report.py --result: the demo's headline figures as a results file, every stage's cost counted
(score_clip included: its time was left out of the report's total before)."""

from __future__ import annotations

import json

import torch

from helpers.scripts import load_script

demo_report = load_script("train", "demo_report")


def test_result_file_holds_the_headline_figures_and_every_stages_cost(tmp_path):
    out = tmp_path / "demo_out"
    costs = {"clip": 600.0, "prior": 120.0, "decoder": 1800.0, "sample": 60.0, "score_clip": 300.0, "evaluate": 30.0}
    for stage, wall in costs.items():
        (out / stage).mkdir(parents=True)
        (out / stage / "DONE.json").write_text(json.dumps({"wall_s": wall, "cpu_s": 2 * wall}))
    (out / "evaluate" / "metrics.json").write_text(
        json.dumps({"fid": 12.5, "clip_score": 30.0, "reference_clip_score": 31.0})
    )
    (out / "retrieval").mkdir()
    (out / "retrieval" / "metrics.json").write_text(json.dumps({"image_to_text_R@1": 0.4, "num_samples": 256}))
    (out / "clip" / "checkpoints").mkdir()
    torch.save({"w": torch.zeros(2)}, out / "clip" / "checkpoints" / "last.ckpt")
    result = tmp_path / "demo.json"
    demo_report.main([str(out), "--result", str(result)])
    res = json.loads(result.read_text())
    fig = res["figures"]
    assert fig["total_wall_min"] == sum(costs.values()) / 60 and fig["total_cpu_min"] == 2 * sum(costs.values()) / 60
    assert fig["stages"]["score_clip"]["wall_s"] == 300.0
    assert fig["fid"] == 12.5 and fig["reference_clip_score"] == 31.0 and fig["retrieval/image_to_text_R@1"] == 0.4
    assert "clip" in res["checkpoints"] and res["split"] == "test" and res["git_sha"]
    assert (out / "report.md").is_file() and "score_clip" in (out / "report.md").read_text()
