"""Plot a run's metrics.csv: python plot_training_curves.py METRICS.csv OUT.png [VAL_TITLE]."""

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = list(csv.DictReader(open(sys.argv[1])))
tr = [r for r in rows if r["split"] == "train"]
va = [r for r in rows if r["split"] == "val" and r["modality"] == "all"]
fig, ax = plt.subplots(1, 3, figsize=(12, 3.4))
ax[0].plot([int(r["step"]) for r in tr], [float(r["loss"]) for r in tr], "-o", ms=3)
ax[0].set_title("training loss (focal x20 + Dice + IoU MSE)")
ax[0].set_xlabel("step")
ax[1].plot([int(r["step"]) for r in va], [float(r["dsc"]) for r in va], "-o", label="DSC")
ax[1].plot([int(r["step"]) for r in va], [float(r["nsd"]) for r in va], "-s", label="NSD 2 mm")
title = sys.argv[3] if len(sys.argv) > 3 else "validation: first 200 val objects (aorta_report_ct)"
ax[1].set_title(title, fontsize=10)
ax[1].set_xlabel("step")
ax[1].legend(loc="center right")
ax[1].set_xlim(0, max(int(r["step"]) for r in rows) * 1.05)
ax[2].plot([int(r["step"]) for r in tr], [float(r["lr"]) for r in tr], "-")
ax[2].set_title("learning rate")
ax[2].set_xlabel("step")
for a in ax:
    a.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=100)
