"""benchmarks.speed's collective-bytes table: the report of a hand-made record."""

from benchmarks import speed


def test_report_prints_collective_bytes_per_kind_and_total():
  mib = 2**20
  record = {"preset": "tiny", "num_params": 1e6, "batch_size": 8, "seq_len": 16,
            "tokens_per_step": 128, "rank": 4, "update_proj_gap": 10, "repeats": 1, "rows": [],
            "collectives": {
                "mesh": "data=2,fsdp=4", "devices": 8, "batch_size": 8, "seq_len": 16,
                "bytes": {
                    "adamw": {"all-gather": 2 * mib, "all-reduce": mib, "reduce-scatter": 0,
                              "all-to-all": 0, "collective-permute": 0},
                    "ng.natural_galore (defaults)": {
                        "all-gather": 3 * mib, "all-reduce": mib // 2, "reduce-scatter": 0,
                        "all-to-all": 0, "collective-permute": 0},
                }}}
  text = speed.report({"presets": [record]})
  assert "`data=2,fsdp=4` mesh (8 CPU devices, batch 8 x seq 16)" in text
  # Kinds that never occur are left out; the total is their sum.
  assert "| optimizer | all-gather | all-reduce | total |" in text
  assert "| adamw | 2.0 | 1.0 | 3.0 |" in text
  assert "| ng.natural_galore (defaults) | 3.0 | 0.5 | 3.5 |" in text


def test_optimizer_labels_with_commas_split_on_bare_commas():
  paper = "ng.natural_galore (std, float32 history 10)"
  assert paper in speed.VARIANTS
  # The label list of --optimizers: ", " belongs to a label, "," separates them.
  assert speed.split_labels(f"adamw,{paper}") == ["adamw", paper]
