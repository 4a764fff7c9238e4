#!/usr/bin/env python3
"""Regenerates tests/golden/wenet: a tiny U2++ Conformer (dense and MoE) trained, saved,
averaged and decoded by WeNet's own code, so the Rust tests can check that our importer
reads what WeNet really writes (train.yaml, final.pt/final.yaml, avg_2.pt, global_cmvn,
lang_char.txt) and that our model computes what WeNet computes (CTC log-probs, hyps).
The two models use the two char-units layouts found in WeNet recipes (see UNITS_LAYOUT):
dense has <sos/eos> last, moe has "<sos/eos> 2" third as aishell's run.sh writes it.

WeNet: github.com/wenet-e2e/wenet at commit 015469960db73eb19c49a48c020d5ac9db69bae5,
used from a checkout given by --wenet (no WeNet code is copied into this repository).

    PYTHONPATH=/path/to/wenet-deps .venv/bin/python scripts/make_wenet_fixture.py \
        --wenet /path/to/wenet --out tests/golden/wenet

Packages WeNet's imports need besides the project's .venv: `bash scripts/wenet_deps.sh
/path/to/wenet-deps` installs them into a separate directory, so .venv stays as it is.

Audio: the 5 LibriVox clips of pocketsphinx-testdata
(/usr/share/pocketsphinx/test/data/librivox); no audio goes into the fixture.

Training is WeNet's own wenet/bin/train.py under torchrun (1 process, torch_ddp, gloo,
--device cpu); tools/compute_cmvn_stats.py and wenet/bin/average_model.py are WeNet's too.
Two shims are applied before WeNet is imported (see _patch_for_torch_2_11):
  * torch.nn.modules.conv.Union no longer exists in torch 2.11 (squeezeformer imports it);
  * torchaudio 2.11's load()/info() need torchcodec (and FFmpeg), so WAVs are read with
    the `wave` module, giving what torchaudio.load gives: float32 samples / 32768, [C, N].
Everything is seeded; train.py seeds torch with 777 and its DataLoader workers are seeded
from a generator seeded with 777.
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

WENET_COMMIT = "015469960db73eb19c49a48c020d5ac9db69bae5"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"

# Training schedule: 2 epochs (so train.py writes epoch_0.pt and epoch_1.pt), each epoch
# being the 5 clips listed REPEATS times.
REPEATS = 150
BATCH_SIZE = 4

DECODE = dict(beam_size=10, num_decoding_left_chunks=-1, ctc_weight=0.3,
              reverse_weight=0.3, simulate_streaming=False, blank_id=0,
              blank_penalty=0.0, length_penalty=0.0)
METHODS = ["ctc_greedy_search", "ctc_prefix_beam_search", "attention",
           "attention_rescoring"]
CHUNKS = {"full": -1, "chunk16": 16}

# Where each model's lang_char.txt puts <sos/eos> (special_tokens <sos> = <eos> = its id):
#   "last":   <blank> 0, <unk> 1, the characters from 2, <sos/eos> last: the older
#             layout, still what several recipes write at this commit, char and BPE
#             (e.g. chime4, hkust, tedlium3 run.sh: units numbered NR+1, then
#             `echo "<sos/eos> $num_token"`);
#   "aishell": <blank> 0, <unk> 1, <sos/eos> 2, the characters from 3, as
#             examples/aishell/s0/run.sh (stage 2) writes it, with special_tokens
#             <sos>: 2, <eos>: 2 as in its conf/train_u2++_conformer.yaml.
UNITS_LAYOUT = {"dense": "last", "moe": "aishell"}


# ----------------------------------------------------------------------------- shims
def _patch_for_torch_2_11():
    import typing
    import wave

    import numpy as np
    import torch
    import torch.nn.modules.conv
    torch.nn.modules.conv.Union = typing.Union
    import torchaudio

    def _read(filepath):
        with wave.open(filepath, "rb") as w:
            assert w.getsampwidth() == 2, filepath
            sr, ch = w.getframerate(), w.getnchannels()
            data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return data.reshape(-1, ch).T, sr

    def load(filepath, frame_offset=0, num_frames=-1, normalize=True,
             channels_first=True, **_):
        data, sr = _read(filepath)
        end = None if num_frames is None or num_frames < 0 else frame_offset + num_frames
        data = data[:, frame_offset:end].astype(np.float32) / 32768.0
        t = torch.from_numpy(np.ascontiguousarray(data))
        return (t if channels_first else t.T), sr

    class _Info:
        def __init__(self, sr, n, ch):
            self.sample_rate, self.num_frames, self.num_channels = sr, n, ch
            self.bits_per_sample, self.encoding = 16, "PCM_S"

    def info(filepath, **_):
        data, sr = _read(filepath)
        return _Info(sr, data.shape[1], data.shape[0])

    torchaudio.load = load
    torchaudio.info = info


def _run_wenet_script(wenet, rel, argv):
    """Runs one of WeNet's scripts in this process (after the shims) as __main__."""
    import runpy
    import torch
    _patch_for_torch_2_11()
    torch.manual_seed(777)
    sys.argv = [os.path.join(wenet, rel)] + argv
    runpy.run_path(os.path.join(wenet, rel), run_name="__main__")


# ----------------------------------------------------------------------------- data
def read_clips():
    """[(key, wav path, text)] of the LibriVox clips, sorted by key."""
    clips = []
    with open(os.path.join(LIBRIVOX, "transcription"), encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^<s> (.*) </s> \((.*)\)$", line.strip())
            assert m, line
            text, key = m.group(1).strip(), m.group(2)
            clips.append((key, os.path.join(LIBRIVOX, key + ".wav"), text))
    return sorted(clips)


def write_lang_char(path, clips, layout):
    """WeNet's char units in the given UNITS_LAYOUT; returns them (list index = id).

    Characters are what wenet/text/char_tokenizer.py (split_with_space false) makes of the
    transcripts (a space becomes "▁"), together with every lowercase letter and the
    apostrophe, sorted by code point (= byte order, what run.sh's `sort | uniq` gives
    under LC_ALL=C).
      "last":    <blank> 0, <unk> 1, the characters from 2, <sos/eos> last;
      "aishell": as examples/aishell/s0/run.sh stage 2: `echo "<blank> 0"`,
                 `echo "<unk> 1"`, `echo "<sos/eos> 2"`, then the sorted unique characters
                 numbered `awk '{print $0 " " NR+2}'`, i.e. from 3.
    """
    from wenet.text.char_tokenizer import CharTokenizer
    tok = CharTokenizer({"<blank>": 0}, None, split_with_space=False)
    chars = set("abcdefghijklmnopqrstuvwxyz'")
    for _, _, text in clips:
        chars.update(tok.text2tokens(text))
    if layout == "last":
        units = ["<blank>", "<unk>"] + sorted(chars) + ["<sos/eos>"]
    elif layout == "aishell":
        units = ["<blank>", "<unk>", "<sos/eos>"] + sorted(chars)
    else:
        raise ValueError(layout)
    with open(path, "w", encoding="utf-8") as f:
        for i, u in enumerate(units):
            f.write("{} {}\n".format(u, i))
    return units


def train_config(name, units, moe):
    """tiny.yaml plus the keys a WeNet recipe config has (aishell's
    train_u2++_conformer.yaml), paths relative to the recipe directory as recipes do;
    special_tokens <sos> = <eos> = the id of <sos/eos> in units."""
    import yaml
    with open(os.path.join(ROOT, "configs", "tiny.yaml")) as f:
        conf = yaml.safe_load(f)
    if moe:
        for k in ("encoder_conf", "decoder_conf"):
            conf[k].update(mlp_type="moe", n_expert=4, n_expert_activated=2)
    conf["tokenizer"] = "char"
    conf["tokenizer_conf"] = {
        "symbol_table_path": "data/dict/lang_char.txt",
        "split_with_space": False,
        "bpe_path": None,
        "non_lang_syms_path": None,
        "is_multilingual": False,
        "num_languages": 1,
        "special_tokens": {"<blank>": units.index("<blank>"),
                           "<unk>": units.index("<unk>"),
                           "<sos>": units.index("<sos/eos>"),
                           "<eos>": units.index("<sos/eos>")},
    }
    conf["ctc"] = "ctc"
    conf["ctc_conf"] = {"ctc_blank_id": 0}
    conf["cmvn"] = "global_cmvn"
    conf["cmvn_conf"] = {"cmvn_file": "data/train/global_cmvn", "is_json_cmvn": True}
    conf["dataset"] = "asr"
    conf["dataset_conf"] = {
        "filter_conf": {"max_length": 40960, "min_length": 0,
                        "token_max_length": 200, "token_min_length": 1},
        "resample_conf": {"resample_rate": 16000},
        # speed perturbation needs torchaudio.sox_effects, gone from torchaudio 2.11.
        "speed_perturb": False,
        "fbank_conf": {"num_mel_bins": 80, "frame_shift": 10, "frame_length": 25,
                       "dither": 1.0},
        # Off so that the tiny model overfits the 5 clips within a few hundred steps;
        # the *_conf values are the recipe's.
        "spec_aug": False,
        "spec_aug_conf": {"num_t_mask": 2, "num_f_mask": 2, "max_t": 50, "max_f": 10},
        "spec_sub": False,
        "spec_sub_conf": {"num_t_sub": 3, "max_t": 30},
        "spec_trim": False,
        "spec_trim_conf": {"max_t": 50},
        "shuffle": True,
        "shuffle_conf": {"shuffle_size": 1500},
        "sort": True,
        "sort_conf": {"sort_size": 8},
        "batch_conf": {"batch_type": "static", "batch_size": BATCH_SIZE},
    }
    conf["grad_clip"] = 5
    conf["accum_grad"] = 1
    conf["max_epoch"] = 2
    conf["log_interval"] = 25
    conf["optim"] = "adam"
    conf["optim_conf"] = {"lr": 0.004}
    conf["scheduler"] = "warmuplr"
    conf["scheduler_conf"] = {"warmup_steps": 50}
    return conf


# ----------------------------------------------------------------------------- model use
def load_model(recipe_dir, ckpt):
    """WeNet's init_model from <model dir>/train.yaml, weights loaded strictly."""
    import types

    import torch
    import yaml
    from wenet.utils.init_model import init_model
    with open(os.path.join(os.path.dirname(ckpt), "train.yaml")) as f:
        configs = yaml.load(f, Loader=yaml.FullLoader)
    cwd = os.getcwd()
    os.chdir(recipe_dir)  # cmvn_file is relative to the recipe directory
    try:
        model, configs = init_model(types.SimpleNamespace(), configs)
    finally:
        os.chdir(cwd)
    state = torch.load(ckpt, map_location="cpu")
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, state


def fbank(wav_path):
    """WeNet's processor.compute_fbank on the clip, dither 0 (before CMVN)."""
    from wenet.dataset import processor
    import torchaudio
    wav, sr = torchaudio.load(wav_path)  # the shim: int16 / 32768
    sample = {"key": "k", "wav": wav, "sample_rate": sr}
    sample = processor.compute_fbank(sample, num_mel_bins=80, frame_length=25,
                                     frame_shift=10, dither=0.0)
    return sample["feat"]


def ctc_log_probs(model, feats, chunk):
    import torch
    with torch.no_grad():
        xs = feats.unsqueeze(0)
        lens = torch.tensor([feats.size(0)], dtype=torch.int32)
        enc, mask = model.encoder(xs, lens, decoding_chunk_size=chunk,
                                  num_decoding_left_chunks=-1)
        return model.ctc.log_softmax(enc)[0]


def decode_all(model, feats):
    import torch
    out = {}
    with torch.no_grad():
        xs = feats.unsqueeze(0)
        lens = torch.tensor([feats.size(0)], dtype=torch.int32)
        for cname, chunk in CHUNKS.items():
            res = model.decode(METHODS, xs, lens, decoding_chunk_size=chunk, **DECODE)
            for m in METHODS:
                out.setdefault(m, {})[cname] = [int(t) for t in res[m][0].tokens]
    return out


def write_expected(model_dir, recipe_dir, clips, units, with_avg):
    import torch
    from safetensors.torch import save_file
    model, state = load_model(recipe_dir, os.path.join(model_dir, "final.pt"))
    avg = load_model(recipe_dir, os.path.join(model_dir, "avg_2.pt"))[0] if with_avg else None
    tensors, hyps = {}, {}
    for key, wav, _ in clips:
        feats = fbank(wav)
        tensors["feats." + key] = feats.float().contiguous()
        for cname, chunk in CHUNKS.items():
            tensors["ctc_log_probs.{}.{}".format(cname, key)] = \
                ctc_log_probs(model, feats, chunk).float().contiguous()
        if avg is not None:
            tensors["avg_2.ctc_log_probs.full." + key] = \
                ctc_log_probs(avg, feats, -1).float().contiguous()
        for m, per_chunk in decode_all(model, feats).items():
            for cname, ids in per_chunk.items():
                hyps.setdefault(m, {}).setdefault(cname, {})[key] = ids
    save_file(tensors, os.path.join(model_dir, "expected.safetensors"),
              metadata={"wenet_commit": WENET_COMMIT, "torch": torch.__version__})
    text = {m: {c: {k: "".join(units[i] for i in ids).replace("▁", " ")
                    for k, ids in d.items()} for c, d in pc.items()}
            for m, pc in hyps.items()}
    settings = dict(DECODE, methods=METHODS,
                    decoding_chunk_size={c: v for c, v in CHUNKS.items()},
                    batch_size=1, checkpoint="final.pt",
                    feats="processor.compute_fbank, 80 bins, 25/10 ms, dither 0.0; "
                          "global CMVN is inside the model",
                    note="one utterance per call to model.decode (no padding)",
                    wenet_commit=WENET_COMMIT, torch=torch.__version__)
    with open(os.path.join(model_dir, "hyps.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "hyps": hyps, "text": text}, f, indent=1,
                  ensure_ascii=False)
        f.write("\n")
    return state, text


# ----------------------------------------------------------------------------- main
def write_recipe_data(recipe, clips):
    """wav.scp + data.list (WeNet's raw format, one JSON per line) in a recipe directory."""
    with open(os.path.join(recipe, "data", "train", "wav.scp"), "w") as f:
        for key, wav, _ in clips:
            f.write("{} {}\n".format(key, wav))
    with open(os.path.join(recipe, "data", "cv.list"), "w") as f:
        for key, wav, text in clips:
            f.write(json.dumps({"key": key, "wav": wav, "txt": text}) + "\n")
    with open(os.path.join(recipe, "data", "train.list"), "w") as f:
        for r in range(REPEATS):
            for key, wav, text in clips:
                f.write(json.dumps({"key": "{}-r{}".format(key, r), "wav": wav,
                                    "txt": text}) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wenet", required=True, help="WeNet checkout")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "golden", "wenet"))
    ap.add_argument("--workdir", help="directory to keep, holding one recipe directory "
                    "per model (<workdir>/dense, <workdir>/moe; default: a temp dir)")
    ap.add_argument("--_run", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    wenet = os.path.abspath(args.wenet)
    sys.path.insert(0, wenet)
    if args._run:  # internal: run a WeNet script with the shims
        _run_wenet_script(wenet, args._run[0], args._run[1:])
        return

    import torch
    import yaml
    _patch_for_torch_2_11()
    torch.manual_seed(777)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    # Each model has its own units file, so each has its own recipe directory, laid out
    # as a WeNet recipe (data/dict/lang_char.txt, data/train/global_cmvn, exp/<name>).
    stale = os.path.join(out, "lang_char.txt")  # older fixtures had one shared file
    if os.path.exists(stale):
        os.remove(stale)
    work = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(
        prefix="wenet-recipes-")
    names = ("dense", "moe")
    me = os.path.abspath(__file__)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([wenet] + [p for p in env.get(
        "PYTHONPATH", "").split(os.pathsep) if p])

    def run(cmd, recipe):
        print("+ (cd {})".format(recipe), " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=recipe, env=env, check=True)

    clips = read_clips()
    recipes, units = {}, {}
    for name in names:
        recipe = recipes[name] = os.path.join(work, name)
        os.makedirs(os.path.join(recipe, "data", "dict"), exist_ok=True)
        os.makedirs(os.path.join(recipe, "data", "train"), exist_ok=True)
        units[name] = write_lang_char(os.path.join(recipe, "data", "dict", "lang_char.txt"),
                                      clips, UNITS_LAYOUT[name])
        write_recipe_data(recipe, clips)
        with open(os.path.join(recipe, "conf_{}.yaml".format(name)), "w") as f:
            yaml.dump(train_config(name, units[name], name == "moe"), f)

    # CMVN: WeNet's tools/compute_cmvn_stats.py over the 5 clips, once (it does not
    # depend on the units), shared by both recipes.
    run([sys.executable, me, "--wenet", wenet, "--_run", "tools/compute_cmvn_stats.py",
         "--num_workers", "0", "--train_config", "conf_dense.yaml",
         "--in_scp", "data/train/wav.scp", "--out_cmvn", "data/train/global_cmvn"],
        recipes["dense"])
    cmvn = os.path.join(recipes["dense"], "data", "train", "global_cmvn")
    shutil.copy(cmvn, os.path.join(recipes["moe"], "data", "train", "global_cmvn"))
    shutil.copy(cmvn, os.path.join(out, "global_cmvn"))

    summary = {}
    for name in names:
        recipe = recipes[name]
        model_dir = os.path.join(recipe, "exp", name)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.makedirs(model_dir)
        run([sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nnodes", "1", "--nproc_per_node", "1", me, "--wenet", wenet,
             "--_run", "wenet/bin/train.py",
             "--train_engine", "torch_ddp", "--device", "cpu",
             "--ddp.dist_backend", "gloo",
             "--config", "conf_{}.yaml".format(name),
             "--data_type", "raw", "--train_data", "data/train.list",
             "--cv_data", "data/cv.list", "--model_dir", "exp/" + name,
             "--tensorboard_dir", "tensorboard", "--num_workers", "1",
             "--prefetch", "10"], recipe)
        # train.py ends with os.symlink('{}.pt'.format(final_epoch), 'final.pt'): at this
        # commit that names "1.pt", which does not exist. Remove it before averaging
        # (average_model.py would pick it up and fail on its mtime).
        final = os.path.join(model_dir, "final.pt")
        if os.path.islink(final):
            print("train.py's final.pt ->", os.readlink(final), flush=True)
            os.remove(final)
        if name == "dense":
            run([sys.executable, os.path.join(wenet, "wenet/bin/average_model.py"),
                 "--dst_model", "exp/dense/avg_2.pt", "--src_path", "exp/dense",
                 "--num", "2"], recipe)
        # final.pt/final.yaml: what the symlink means to be, the last epoch's checkpoint.
        shutil.copy(os.path.join(model_dir, "epoch_1.pt"), final)
        shutil.copy(os.path.join(model_dir, "epoch_1.yaml"),
                    os.path.join(model_dir, "final.yaml"))
        with open(os.path.join(model_dir, "epoch_1.yaml")) as f:
            summary[name] = yaml.load(f, Loader=yaml.FullLoader)["loss_dict"]

        dst = os.path.join(out, name)
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        keep = ["train.yaml", "final.pt", "final.yaml"]
        if name == "dense":
            keep += ["avg_2.pt", "epoch_0.yaml", "epoch_1.yaml"]
        for fn in keep:
            shutil.copy(os.path.join(model_dir, fn), os.path.join(dst, fn))
        shutil.copy(os.path.join(recipe, "data", "dict", "lang_char.txt"),
                    os.path.join(dst, "lang_char.txt"))
        write_expected(dst, recipe, clips, units[name], with_avg=(name == "dense"))
        print(name, "cv loss_dict", summary[name], flush=True)

    write_readme(out, units, summary)
    if not args.workdir:
        shutil.rmtree(work)


def write_readme(out, units, summary):
    import torch
    sizes = []
    for path in sorted(glob.glob(os.path.join(out, "**", "*"), recursive=True)):
        if os.path.isfile(path) and not path.endswith("README.md"):
            sizes.append("| `{}` | {} |".format(os.path.relpath(path, out),
                                                os.path.getsize(path)))
    d, m = units["dense"], units["moe"]
    assert UNITS_LAYOUT == {"dense": "last", "moe": "aishell"}  # what README describes
    text = README.format(commit=WENET_COMMIT, torch=torch.__version__,
                         dense_vocab=len(d), dense_sos=d.index("<sos/eos>"),
                         dense_first_char=2, dense_last_char=d.index("<sos/eos>") - 1,
                         moe_vocab=len(m), moe_sos=m.index("<sos/eos>"),
                         moe_first_char=m.index("<sos/eos>") + 1, moe_last_char=len(m) - 1,
                         repeats=REPEATS, batch=BATCH_SIZE,
                         sizes="\n".join(sizes),
                         losses=json.dumps(summary, indent=1, sort_keys=True))
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


README = """# WeNet fixture

Written by `scripts/make_wenet_fixture.py` with WeNet's own code
(github.com/wenet-e2e/wenet at commit `{commit}`, torch {torch}, CPU):

    PYTHONPATH=/path/to/wenet-deps .venv/bin/python scripts/make_wenet_fixture.py \\
        --wenet /path/to/wenet --out tests/golden/wenet

(the script's header lists the packages WeNet needs). Input: the 5 LibriVox clips of
pocketsphinx-testdata (`/usr/share/pocketsphinx/test/data/librivox`); keys below are their
file stems. No audio is stored here.

## Files

* `global_cmvn`: JSON (`mean_stat`, `var_stat`, `frame_num`) from WeNet's
  `tools/compute_cmvn_stats.py` over the 5 clips (dither 0); shared by both models.
* `dense/`, `moe/`: a tiny U2++ Conformer (configs/tiny.yaml; `moe` adds
  `mlp_type: moe`, `n_expert: 4`, `n_expert_activated: 2` to encoder_conf and
  decoder_conf) trained by WeNet's `wenet/bin/train.py` (torchrun, 1 process,
  `--train_engine torch_ddp --device cpu --ddp.dist_backend gloo`) for 2 epochs, each
  epoch the 5 clips {repeats} times, batch size {batch}. Each was trained in a recipe
  directory of its own (`data/dict/lang_char.txt`, `data/train/global_cmvn`,
  `exp/<name>`).
  * `lang_char.txt`: the model's WeNet char units: `<blank> 0`, `<unk> 1`, `<sos/eos>`,
    and the characters `'`, `a`..`z`, `▁` (space, as `wenet/text/char_tokenizer.py`
    writes it) in code-point order. Both layouts that WeNet recipes write exist in the
    wild, so the two models use one each and importers are tested on both:
    * `dense/lang_char.txt`: `<sos/eos>` last: the characters {dense_first_char}..{dense_last_char},
      then `<sos/eos> {dense_sos}` ({dense_vocab} units). This is the older layout, still
      written at this commit by several recipes, char and BPE (e.g. chime4, hkust,
      tedlium3 `run.sh`: `NR+1`, then `echo "<sos/eos> $num_token"`). train.yaml's
      `tokenizer_conf.special_tokens` has `<sos>: {dense_sos}`, `<eos>: {dense_sos}`.
    * `moe/lang_char.txt`: the layout of `examples/aishell/s0/run.sh` stage 2 (also
      librispeech's and gigaspeech's at this commit): `<blank> 0`, `<unk> 1`,
      `<sos/eos> {moe_sos}`, then the sorted characters numbered `NR+2`, i.e.
      {moe_first_char}..{moe_last_char} ({moe_vocab} units). train.yaml's special_tokens has
      `<sos>: {moe_sos}`, `<eos>: {moe_sos}`, as aishell's `conf/train_u2++_conformer.yaml`.
  * `train.yaml`: as `check_modify_and_save_config` wrote it. Paths in it
    (`cmvn_conf.cmvn_file: data/train/global_cmvn`, `tokenizer_conf.symbol_table_path:
    data/dict/lang_char.txt`, `model_dir: exp/<name>`) are relative to the recipe
    directory of the run, as in any WeNet recipe; the files are `../global_cmvn` and
    `lang_char.txt` (in the model directory) here.
  * `final.pt` + `final.yaml`: the state dict (`save_checkpoint`) and info yaml
    (`save_model`) of the last epoch, i.e. train.py's `epoch_1.pt`/`epoch_1.yaml`.
    (train.py at this commit symlinks `final.pt` to `1.pt`, a file that does not
    exist; the script copies `epoch_1.*` instead.)
  * dense only: `avg_2.pt` from `wenet/bin/average_model.py --dst_model avg_2.pt
    --src_path <model dir> --num 2` over `epoch_0.pt` and `epoch_1.pt` (their yaml files
    are kept; the .pt files are not). average_model true-divides every tensor, so the
    int64 `num_batches_tracked` buffers (if any) become float.
  * `expected.safetensors` (float32): `feats.K` [T, 80] (WeNet's
    `processor.compute_fbank`, dither 0, before CMVN), `ctc_log_probs.full.K` and
    `ctc_log_probs.chunk16.K` [T', vocab] (`model.encoder(feats, lens,
    decoding_chunk_size=-1|16, num_decoding_left_chunks=-1)` then
    `model.ctc.log_softmax`, eval mode, final.pt); dense also
    `avg_2.ctc_log_probs.full.K` (avg_2.pt).
  * `hyps.json`: `model.decode` token ids per method (ctc_greedy_search,
    ctc_prefix_beam_search, attention, attention_rescoring) and chunk (full = -1,
    chunk16 = 16), one utterance per call; `settings` has every decode argument,
    `text` the same decoded with the model's `lang_char.txt`.

## CV losses after the last epoch (epoch_1.yaml)

```
{losses}
```

## Sizes (bytes)

| file | bytes |
|---|---|
{sizes}
"""

if __name__ == "__main__":
    main()
