"""The paper's numbers (Frasch, minAction.net, arXiv 2604.24805: its abstract, v1 and v2), the
one place the report's sections and statistics read them from."""

PAPER = {
    "np2_arch": 0.001,
    "n_experiments": 2203,
    "seeds": 10,
    "np2_interaction": 0.44,
    "sweep_orders": 3,
    "sweep_v1_pct": 6,
    "sweep_acc_pp": 0.5,
    "gain_lo_pct": 5,
    "gain_hi_pct": 33,
}
