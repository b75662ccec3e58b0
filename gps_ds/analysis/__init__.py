"""`gps-ds analyze`: what GPS selects and how the result behaves (the paper's Figs. 8-13).

One module per analysis: `counts` (trainable parameters vs K from shapes, Table 7 / Fig. 8),
`blocks` (per-block distribution of two selections, Fig. 9), `overlap` (selections of several
tasks, Fig. 12), `tsne` (penultimate features before and after fine-tuning, Fig. 13). Each writes
a PNG and a JSON into an output folder (`common.write_outputs`) and can attach both to an MLflow run.
"""
