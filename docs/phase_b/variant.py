"""One phase-B variant on the device: calibrate the step time under the real (concurrent) load, size max_steps to
the time budget, then train through senri.training.recipes.train (profile real-finetune) and evaluate the grid."""
import json, os, sys, time
import torch
from senri.training.config import ConfigManager

name, budget = sys.argv[1], float(sys.argv[2])
VARIANTS = {
    "b-lr3e-4": {},
    "b-lr1e-3": {"training.learning_rate": 1.0e-3},
    "b-fresh": {"training.finetune_init": None, "training.learning_rate": 1.0e-3},
}
overrides = {"experiment.run_dir": f"runs/{name}", **VARIANTS[name]}
if os.environ.get("SMOKE"):
    overrides.update({"training.finetune_curriculum": [[0.0, 384], [0.5, 448]], "training.per_device_batch_size": 1,
                      "training.finetune_eval_steps": 2, "training.save_steps": 2, "training.logging_steps": 1})
cfg = ConfigManager("real-finetune", overrides)
from senri.model.conversion import load_base_model
from senri.training.finetune import add_lora, initial_model, passkey_sample, answer_loss, settings_from_config
import random
settings = settings_from_config(cfg)
dev = "cuda" if torch.cuda.is_available() else "cpu"
base, tok = load_base_model("local-smollm2")
base = base.to(dev)
pm = add_lora(initial_model(cfg, base).to(dev), settings)
L = settings.curriculum[-1][1]
ids = torch.tensor([passkey_sample(tok, L, 320, random.Random(i))[0] for i in range(settings.batch_size)], device=dev)
n = torch.full((settings.batch_size,), 6, device=dev)
times = []
for i in range(3):
    if dev == "cuda": torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        loss = answer_loss(pm, ids, n)
    loss.backward()
    pm.zero_grad(set_to_none=True)
    if dev == "cuda": torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
step_s = min(times[1:]) * 1.35  # + the KL pass and the optimizer
steps = max(4, int(budget / step_s * 1.25))  # early stages are shorter; the time budget stops it anyway
print(json.dumps({"variant": name, "calibration_s": times, "max_steps": steps}), flush=True)
del pm, base
if dev == "cuda": torch.cuda.empty_cache()
cfg = ConfigManager("real-finetune", {**overrides, "training.max_steps": steps, "training.finetune_time_budget_s": budget,
                                      "training.finetune_eval_steps": max(2, steps // 6) if not os.environ.get("SMOKE") else 2})
from senri.training.recipes import train
summary = train(cfg)
print(json.dumps({"variant": name, "summary": summary}), flush=True)
