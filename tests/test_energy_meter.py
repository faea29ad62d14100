"""The RAPL reader on a fake powercap tree (real counters are rarely exposed to VMs)."""
from minaction.energy_meter import EnergyMeter


def _domain(root, name, uj, rng=1_000_000):
    d = root / name
    d.mkdir()
    (d / "energy_uj").write_text(str(uj))
    (d / "max_energy_range_uj").write_text(str(rng))
    return d / "energy_uj"


def test_rapl_sums_packages_and_handles_wraparound(tmp_path):
    p0 = _domain(tmp_path, "intel-rapl:0", 100)
    p1 = _domain(tmp_path, "intel-rapl:1", 999_000)
    _domain(tmp_path, "intel-rapl:0:0", 5)  # a sub-domain: already inside package 0
    with EnergyMeter(powercap_root=tmp_path) as m:
        p0.write_text(str(2_500_100))  # +2.5 J
        p1.write_text(str(500))  # wrapped: +1500 uJ
    assert abs(m.joules["rapl"] - (2.5 + 0.0015)) < 1e-9
    assert m.seconds >= 0


def test_missing_sources_give_reasons_not_numbers(tmp_path):
    with EnergyMeter(powercap_root=tmp_path / "none") as m:
        pass
    assert m.joules["rapl"] is None and "no RAPL" in m.reasons["rapl"]
    assert m.joules["nvml"] is None and m.reasons["nvml"]


def test_a_reused_meter_measures_each_block_afresh(tmp_path):
    """joules and reasons were set in __init__ only: a second block showed the first one's reading."""
    p0 = _domain(tmp_path, "intel-rapl:0", 100)
    m = EnergyMeter(powercap_root=tmp_path)
    with m:
        p0.write_text(str(2_000_100))
    assert abs(m.joules["rapl"] - 2.0) < 1e-9 and "rapl" not in m.reasons
    m.root = tmp_path / "gone"  # the counters disappear before the second block
    with m:
        pass
    assert m.joules["rapl"] is None and "no RAPL" in m.reasons["rapl"]
