# Phase B on this CPU (1 thread): the shipped run's settings (real-finetune, lr 1e-3, the same 768-step schedule),
# stopped by a 45-minute budget; exact resume from runs/real-finetune-cpu if restarted.
import json, torch
torch.set_num_threads(1)
from senri.training.config import ConfigManager
from senri.training.recipes import train
cfg = ConfigManager("real-finetune", {"experiment.run_dir": "runs/real-finetune-cpu", "training.max_steps": 768,
      "training.learning_rate": 1e-3, "training.finetune_time_budget_s": 2700, "training.finetune_eval_steps": 128,
      "training.save_steps": 25, "training.logging_steps": 5})
s = train(cfg); print(json.dumps(s)[:2000])
