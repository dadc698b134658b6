"""What a reviewer reads in TensorBoard, read back from a short run's event files: no placeholder cards, an
HPARAMS row with the run's settings and final metrics (one per run, resumed or not), curves by training
tokens, and samples with both decodings laid out as tables that render as written."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest
from tensorboard import plugin_util
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

from pretrain.callbacks.text_samples import markdown_table
from pretrain.data.prepare.next_line import validation_texts
from pretrain.data.prepare.tokenizer import load_tokenizer
from tests.helpers.runs import run_quietly, scalars_by_step, tiny_fit_args

GROUPS = ("train/", "val/", "eval/", "perf/", "tokens/")
TOKENS_PER_STEP = 8 * 64  # the tiny run's batch_size x seq_len, one device, no accumulation


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def hparams_data(accumulator: EventAccumulator, tag: str) -> plugin_data_pb2.HParamsPluginData:
    return plugin_data_pb2.HParamsPluginData.FromString(accumulator.PluginTagToContent("hparams")[tag])


class Cells(HTMLParser):
    """The text of every table cell of rendered HTML, line breaks as newlines."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self.inside = False

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in ("td", "th"):
            self.cells.append("")
            self.inside = True
        elif tag == "br" and self.inside:
            self.cells[-1] += "\n"

    def handle_endtag(self, tag: str) -> None:
        self.inside = self.inside and tag not in ("td", "th")

    def handle_data(self, data: str) -> None:
        if self.inside:
            self.cells[-1] += data.replace("\xa0", " ")


def rendered_cells(markdown: str) -> list[str]:
    """As TensorBoard's TEXT tab renders Markdown (its own converter and sanitizer)."""
    parser = Cells()
    parser.feed(plugin_util.markdown_to_safe_html(markdown))
    return parser.cells


@pytest.fixture(scope="module")
def run(corpus, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    logs = tmp_path_factory.mktemp("review")
    for max_steps, resume in (("20", ()), ("40", ("--ckpt_path", "last"))):  # stopped at 20, resumed to 40
        run_quietly(
            tiny_fit_args(
                corpus[0],
                prepared,
                logs,
                "--trainer.max_steps",
                max_steps,
                "--model.lr_scheduler.init_args.max_steps",
                "40",
                *resume,
            ),
            logs,
        )
    return logs / "quickstart" / "version_0"


def test_no_placeholder_cards_and_every_tag_in_a_group(run: Path) -> None:
    tags = events(run).Tags()["scalars"]
    assert "epoch" not in tags and "hp_metric" not in tags
    assert all(tag.startswith(GROUPS) for tag in tags), tags


def test_one_hparams_row_per_run_with_its_settings_and_final_metrics(run: Path, corpus) -> None:
    accumulator = events(run)
    written = [
        value.tag
        for file in sorted(run.glob("events.out.tfevents.*"))
        for event in EventFileLoader(str(file)).Load()
        for value in event.summary.value
    ]
    assert written.count("_hparams_/session_start_info") == 1  # the resumed run added no second row
    settings = hparams_data(accumulator, "_hparams_/session_start_info").session_start_info.hparams
    number = {name: value.number_value for name, value in settings.items()}
    text = {name: value.string_value for name, value in settings.items()}
    assert number["tokens_per_step"] == TOKENS_PER_STEP and number["seq_len"] == 64 and number["devices"] == 1
    assert number["lr"] == pytest.approx(0.02)  # the quickstart's Muon rate
    assert number["warmup_steps"] == 20 and number["vocab_size"] == 320
    assert number["parameters"] == 123_200 and text["preset"] == "tiny" and text["data"] == str(corpus[0])
    assert text["optimizer"] == "MuonWithAdamW" and text["schedule"] == "WarmupStableDecayLR"
    assert text["precision"] == "32-true"
    metrics = [info.name.tag for info in hparams_data(accumulator, "_hparams_/experiment").experiment.metric_infos]
    assert metrics == ["val/loss", "val/bpb", "eval/next_line/acc", "perf/tokens_per_sec"]
    for tag in metrics:  # the table shows each one's latest value: logged, the held-out ones at the last step
        assert scalars_by_step(run, tag) and (tag.startswith("perf/") or max(scalars_by_step(run, tag)) == 39)


def test_curves_by_training_tokens(run: Path) -> None:
    for name in ("train_loss", "val_loss", "val_bpb"):
        by_tokens = scalars_by_step(run, f"tokens/{name}")
        by_step = scalars_by_step(run, name.replace("_", "/", 1))
        # Lightning writes a step's metrics under its index (step - 1); the tokens count every step done.
        assert by_tokens == {(step + 1) * TOKENS_PER_STEP: value for step, value in by_step.items()}, name
    assert max(scalars_by_step(run, "tokens/train_loss")) == 40 * TOKENS_PER_STEP  # counted on across the resume


def test_samples_hold_both_decodings_and_held_out_documents(run: Path, prepared: Path) -> None:
    text = events(run).Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    cells = rendered_cells(text)
    assert cells[:3] == ["prompt", "greedy", "sampled (temperature 0.8, top-k 50)"]
    prompts = cells[3:12]
    assert prompts[0::3] == ["def ", "import ", "class Queue"]  # the quickstart's prompts, as written
    assert prompts[1::3] != prompts[2::3]  # sampling draws other text than the greedy choice
    header = cells.index("a held-out document begins")
    documents = cells[header + 3 :]
    assert len(documents) == 9  # three held-out documents: their start, the model's text, the real text
    texts = list(validation_texts(prepared, load_tokenizer(prepared / "tokenizer.json")))
    for shown, real in zip(documents[0::3], documents[2::3], strict=True):
        assert any(document.startswith(shown + real) for document in texts)


def test_a_run_resumed_from_a_given_checkpoint_into_a_new_folder(corpus, prepared: Path, tmp_path: Path) -> None:
    """From a given checkpoint (not ``last``) a run continues in a new folder, which gets its own HPARAMS row
    and the token count where the checkpoint left it. The last step is on the token curve even off the
    logging interval."""
    every = ("--trainer.log_every_n_steps", "3", "--model.lr_scheduler.init_args.max_steps", "40")
    run_quietly(tiny_fit_args(corpus[0], prepared, tmp_path, "--trainer.max_steps", "20", *every), tmp_path)
    checkpoint = tmp_path / "quickstart" / "version_0" / "checkpoints" / "step=0000020.ckpt"
    run_quietly(
        tiny_fit_args(
            corpus[0], prepared, tmp_path, "--trainer.max_steps", "40", *every, "--ckpt_path", str(checkpoint)
        ),
        tmp_path,
    )
    resumed = tmp_path / "quickstart" / "version_1"
    written = [
        value.tag
        for file in resumed.glob("events.out.tfevents.*")
        for event in EventFileLoader(str(file)).Load()
        for value in event.summary.value
    ]
    assert written.count("_hparams_/session_start_info") == 1
    by_tokens = scalars_by_step(resumed, "tokens/train_loss")
    assert min(by_tokens) == 21 * TOKENS_PER_STEP and max(by_tokens) == 40 * TOKENS_PER_STEP
    assert by_tokens[40 * TOKENS_PER_STEP] == scalars_by_step(resumed, "train/loss")[39]


def test_a_table_renders_each_cell_as_written() -> None:
    cells = [
        ("def f(x):\n    return x | y  # *not* _emphasis_", "<b>bold?</b> & [a](link) `code` 1. \\n"),
        ("| pipes | and ---", "  two leading spaces, one trailing "),
    ]
    assert rendered_cells(markdown_table(("left", "right"), cells)) == ["left", "right", *cells[0], *cells[1]]


def test_line_ends_and_control_characters_stay_in_their_cell() -> None:
    cells = rendered_cells(markdown_table(("a", "b"), [("windows\r\nline\rend", "nul\x00 tab\tvt\x0b")]))
    assert cells == ["a", "b", "windows\nline\nend", "nul\u2400 tab    vt\u240b"]
