"""The Dagster and MLflow UIs started with `make ui` and `make mlflow-ui` on the 2-round data root of
`trained_run`, and in a real browser (headless Debian Chromium via Playwright): what a person looks for.

Screenshots go to tests/screenshots/; DAPO_VLM_UPDATE_DOCS=1 also copies the two the docs show to docs/.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest
from ui_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO,
    UiProcess,
    ensure_chromium,
    free_port,
    http_ok,
    loaded_code_location,
    make_command,
    mlflow_ids,
)

# Playwright drives the system Chromium; its own browser download must never run.
os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"

SCREENSHOTS = REPO / "tests" / "screenshots"
DOCS = REPO / "docs"
README_SHOTS = {"dagster_asset_graph.png", "dagster_attention_report.png"}
ASSETS = ("dataset", "base_checkpoint", "rollouts", "attention_metrics", "rewards", "policy_update",
          "attention_report", "training_report")
UI_TIMEOUT_MS = 30_000
SERVER_START_S = 180
RUN_TIMEOUT_MS = 300_000


@dataclass
class Uis:
    dagster: str
    mlflow: str
    location: str  # the Dagster code location's name
    run_name: str  # the training run in both UIs
    mlflow_pid: int  # `make mlflow-ui`, the leader of its process group


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt when missing: a failure fails CI and skips elsewhere."""
    problem = ensure_chromium()
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"Chromium for the browser tests: {problem}")
        pytest.skip(f"no Chromium for the browser tests: {problem}")
    return str(CHROMIUM)


@pytest.fixture(scope="module")
def uis(trained_run, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Uis]:
    """`make ui` and `make mlflow-ui` with only DAPO_VLM_HOME set, as after `make run`: both must find the
    data root's Dagster instance and MLflow store by themselves."""
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI")}
    env.update(DAPO_VLM_HOME=str(trained_run.root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    logs = tmp_path_factory.mktemp("ui_logs")
    dagster_port, mlflow_port = free_port(), free_port()
    dagster_base, mlflow_base = f"http://127.0.0.1:{dagster_port}", f"http://127.0.0.1:{mlflow_port}"
    started: list[UiProcess] = []
    try:
        dagster = UiProcess("make ui", make_command("ui", dagster_port), env, logs / "dagster.log", dagster_base)
        started.append(dagster)
        mlflow = UiProcess("make mlflow-ui", make_command("mlflow-ui", mlflow_port), env, logs / "mlflow.log",
                           mlflow_base)
        started.append(mlflow)
        location: list[str] = []

        def dagster_ready() -> bool:
            name = http_ok(f"{dagster_base}/server_info") and loaded_code_location(dagster_base)
            if name:
                location.append(name)
            return bool(name)

        dagster.wait_until(dagster_ready, SERVER_START_S, "loaded code location")
        mlflow.wait_until(lambda: http_ok(f"{mlflow_base}/health") and bool(
            mlflow_ids(mlflow_base, "dapo-vlm", trained_run.run_name)), SERVER_START_S, "run in the MLflow API")
        yield Uis(dagster=dagster_base, mlflow=mlflow_base, location=location[0], run_name=trained_run.run_name,
                  mlflow_pid=mlflow.process.pid)
    finally:
        for process in started:
            process.terminate()
        for process in started:
            process.stop()


@pytest.fixture(scope="module")
def browser(chromium: str):
    from playwright.sync_api import sync_playwright

    for stale in SCREENSHOTS.glob("FAILED-*.png"):
        stale.unlink()
    with sync_playwright() as playwright:
        # launch() gives every browser a fresh temporary user-data-dir.
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, request: pytest.FixtureRequest):
    """A fresh browser context per test (its own storage); on failure its screenshot is kept."""
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    # Dagster's "Join the community" dialog covers the page on localhost; a person clicks Skip, which
    # stores exactly this flag.
    context.add_init_script("window.localStorage.setItem('communityNux', '\"1\"')")
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        page.screenshot(path=str(SCREENSHOTS / f"FAILED-{name}.png"))
    context.close()


def save(page_or_locator, name: str, **kwargs) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page_or_locator.screenshot(path=str(path), **kwargs)
    if name in README_SHOTS and os.environ.get("DAPO_VLM_UPDATE_DOCS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / name)
    return path


def show_markdown(page, base: str, asset: str, partition: str, entry: str):
    """Open `asset`'s newest materialization of `partition` and the markdown of metadata `entry`; returns
    the dialog."""
    from playwright.sync_api import expect

    page.goto(f"{base}/assets/{asset}?view=events")
    page.get_by_text(partition, exact=True).first.click()
    expect(page.get_by_text(f"Partition {partition} materialized")).to_be_visible()
    row = page.get_by_role("row").filter(has=page.get_by_text(entry, exact=True))
    row.get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    return dialog


def choose_partition(page, dialog, key: str) -> None:
    """Type the key into the launchpad's partition box and pick it from the suggestions. The launchpad may
    still be settling (it re-renders when its session loads): try again while the choice does not stick."""
    from playwright.sync_api import Error, expect

    for attempt in range(3):
        try:
            box = dialog.get_by_placeholder("Partition")
            box.click()
            box.fill(key)
            page.get_by_role("menuitem", name=key).click(timeout=10_000)
            expect(dialog.get_by_text(f"partition: {key}")).to_be_visible(timeout=10_000)
            return
        except (AssertionError, Error):
            if attempt == 2:
                raise


# ----------------------------------------------------------------------------------------------- Dagster


@pytest.mark.slow
def test_make_ui_and_make_mlflow_ui_start_on_the_data_root_of_make_run(uis):
    """Both servers answer, Dagster with the code location loaded and MLflow with the run (no browser needed)."""
    assert loaded_code_location(uis.dagster) == uis.location
    assert mlflow_ids(uis.mlflow, "dapo-vlm", uis.run_name)


@pytest.mark.slow
def test_make_mlflow_ui_starts_no_job_runner(uis):
    """MLflow's job runner (GenAI scorer jobs, never used here) would start a pool of consumer processes."""
    import psutil

    tree = psutil.Process(uis.mlflow_pid).children(recursive=True)
    assert tree and not [p for p in tree if "huey" in " ".join(p.cmdline())]


@pytest.mark.browser
def test_asset_graph_shows_the_eight_assets_with_partitions_and_checks(uis, page):
    from playwright.sync_api import expect

    # Wide enough that the graph draws full asset cards (status, partitions, checks), not just names.
    page.set_viewport_size({"width": 1920, "height": 900})
    page.goto(f"{uis.dagster}/locations/{uis.location}/asset-groups/dapo/lineage")
    page.get_by_text("Hide navigation").click()
    for asset in ASSETS:
        expect(page.get_by_text(asset, exact=True).first).to_be_visible()
    # Two of the three checkpoint partitions have a round; ckpt-0002 is the next round's input.
    expect(page.get_by_text("66% filled").first).to_be_visible()
    # The check summaries of rewards (4 checks) and policy_update (3 checks, one of them blocking).
    expect(page.get_by_text(re.compile(r"^\d / 4 Passed$"))).to_be_visible()
    expect(page.get_by_text(re.compile(r"^\d / 3 Passed$"))).to_be_visible()
    # The README picture: the graph's band, without the page chrome or the zoom buttons at the right edge.
    titles = {asset: page.get_by_text(asset, exact=True).first.bounding_box() for asset in ASSETS}
    column = titles["base_checkpoint"]["x"] - titles["dataset"]["x"]  # card width + gap, one per layer
    left, top = max(0, titles["dataset"]["x"] - 40), max(0, min(b["y"] for b in titles.values()) - 40)
    right = min(1920 - 56, titles["training_report"]["x"] + column)
    bottom = min(900, max(b["y"] for b in titles.values()) + 150)
    save(page, "dagster_asset_graph.png", clip={"x": left, "y": top, "width": right - left, "height": bottom - top})


@pytest.mark.browser
@pytest.mark.parametrize(("asset", "upstream", "downstream"), [
    ("rollouts", "base_checkpoint", "attention_metrics"),
    ("rewards", "attention_metrics", "policy_update"),
    ("training_report", "attention_report", None),
])
def test_asset_page_shows_its_upstream_and_downstream_assets(uis, page, asset, upstream, downstream):
    from playwright.sync_api import expect

    page.goto(f"{uis.dagster}/assets/{asset}")
    expect(page.get_by_role("link", name=re.compile(rf"\b{upstream}\b")).first).to_be_visible()
    text = page.locator("body").inner_text()
    sections = dict(re.findall(r"(Upstream|Downstream) assets\n(.*?)\n(?=Downstream assets|Definition)", text,
                               flags=re.DOTALL))
    assert upstream in sections.get("Upstream", "").split(), text
    if downstream:
        assert downstream in sections.get("Downstream", "").split(), text


@pytest.mark.browser
def test_checkpoints_partitions_show_their_materialization_status(uis, page):
    from playwright.sync_api import expect

    page.goto(f"{uis.dagster}/assets/rollouts?view=partitions")
    for key in ("ckpt-0000", "ckpt-0001", "ckpt-0002"):
        expect(page.get_by_text(key, exact=True).first).to_be_visible()
    expect(page.get_by_text("Materialized (2)")).to_be_visible()
    expect(page.get_by_text("Missing (1)")).to_be_visible()
    page.get_by_text("ckpt-0001", exact=True).first.click()
    # SMALL_RUN: 8 prompts x 4 generations.
    expect(page.get_by_role("row").filter(has=page.get_by_text("num_rollouts", exact=True))).to_contain_text("32")
    save(page, "dagster_rollouts_partitions.png")


@pytest.mark.browser
def test_attention_report_renders_as_markdown_with_tables_and_chart(uis, page):
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 1280, "height": 1400})  # room for the tables and the chart
    dialog = show_markdown(page, uis.dagster, "attention_report", "ckpt-0001", "report")
    expect(dialog.get_by_role("heading", name="Attention diagnostics")).to_be_visible()
    stages = dialog.get_by_role("table").filter(has=page.get_by_role("cell", name="MDI Mean"))
    expect(stages.get_by_role("columnheader")).to_have_text(["Metric", "Early", "Middle", "Late", "All"])
    number = re.compile(r"^\d+\.\d{3}$")
    expect(stages.get_by_role("row").filter(has=page.get_by_text("MDI Mean")).get_by_role("cell")).to_have_text(
        ["MDI Mean", number, number, number, number])
    chart = dialog.get_by_role("img", name="Attention balance per stage")
    expect(chart).to_be_visible()
    assert chart.evaluate("img => img.complete && img.naturalWidth > 0"), "the chart did not load"
    box, chart_box = dialog.bounding_box(), chart.bounding_box()
    bottom = min(box["y"] + box["height"], chart_box["y"] + chart_box["height"] + 24)
    save(page, "dagster_attention_report.png",
         clip={"x": box["x"], "y": box["y"], "width": box["width"], "height": bottom - box["y"]})


@pytest.mark.browser
@pytest.mark.parametrize(("entry", "heading", "text"), [
    ("rollout_results", "Rollout results", "Accuracy Mean"),
    ("run_terminal", "Run terminal", "attention/all/mdi"),
])
def test_training_report_renders_the_other_two_reports(uis, page, entry, heading, text):
    from playwright.sync_api import expect

    dialog = show_markdown(page, uis.dagster, "training_report", "ckpt-0001", entry)
    expect(dialog.get_by_role("heading", name=heading)).to_be_visible()
    expect(dialog.get_by_text(text).first).to_be_visible()
    save(page, f"dagster_{entry}.png")


@pytest.mark.browser
@pytest.mark.parametrize(("asset", "checks"), [
    ("rewards", ("attention_reward_no_variance", "clipped_completions", "format_collapse",
                 "zero_variance_groups")),
    ("policy_update", ("entropy_collapse", "eval_accuracy_drop", "non_finite")),
])
def test_health_checks_show_their_results(uis, page, asset, checks):
    from playwright.sync_api import expect

    page.goto(f"{uis.dagster}/assets/{asset}?view=checks")
    expect(page.get_by_text(f"Checks ({len(checks)})")).to_be_visible()
    for check in checks:
        expect(page.get_by_text(check, exact=True).first).to_be_visible()
    # The selected check: its pass/fail on the latest round and the finding behind it.
    expect(page.get_by_text("Evaluation result")).to_be_visible()
    expect(page.get_by_text(re.compile(r"^(Passed|Failed)$")).first).to_be_visible()
    expect(page.get_by_text("finding", exact=True)).to_be_visible()
    expect(page.get_by_text("remedy", exact=True)).to_be_visible()
    save(page, f"dagster_{asset}_checks.png")


# ------------------------------------------------------------------------------------------------ MLflow


def close_assistant(page) -> None:
    close = page.get_by_role("button", name="Close")
    if close.count() == 1:  # the assistant side panel, only in the way of the screenshots
        close.click()


def click_until_shown(item, shown, attempts: int = 3) -> None:
    """Click `item` until `shown` is visible, as a person clicks again when a click landed while the list was
    being redrawn (MLflow's artifact tree re-renders as each folder's listing arrives)."""
    from playwright.sync_api import expect

    for attempt in range(attempts):
        item.click()
        try:
            expect(shown).to_be_visible(timeout=UI_TIMEOUT_MS // attempts)
            return
        except AssertionError:
            if attempt == attempts - 1:
                raise


def open_experiment(page, uis: Uis) -> None:
    """Home → Model training → experiment dapo-vlm (its runs), as a person clicks through."""
    page.goto(uis.mlflow)
    page.get_by_text("Model training", exact=True).click()
    page.get_by_role("link", name="dapo-vlm", exact=True).first.click()


def open_training_run(page, uis: Uis) -> None:
    """Home → Model training → experiment dapo-vlm → the training run, as a person clicks through."""
    from playwright.sync_api import expect

    open_experiment(page, uis)
    page.get_by_role("link", name=uis.run_name, exact=True).click()
    expect(page.get_by_role("heading", name=uis.run_name)).to_be_visible()
    close_assistant(page)


@pytest.mark.browser
def test_mlflow_run_charts_attention_mdi(uis, page):
    from playwright.sync_api import expect

    open_training_run(page, uis)
    page.get_by_text("Model metrics", exact=True).click()
    page.get_by_placeholder("Search metric charts").fill("attention/all/mdi")
    expect(page.get_by_text(f"{uis.run_name} (attention/all/mdi)", exact=True).first).to_be_visible()
    save(page, "mlflow_attention_mdi.png")


@pytest.mark.browser
def test_mlflow_run_has_the_reports_as_artifacts(uis, page):
    from playwright.sync_api import expect

    open_training_run(page, uis)
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("reports", exact=True).click()
    page.get_by_text("ckpt-0001", exact=True).click()
    for name in ("attention_diagnostics.md", "rollout_results.md", "run_terminal.md", "learning_curves.png",
                 "attention_balance.png"):
        expect(page.get_by_text(name, exact=True)).to_be_visible()
    click_until_shown(page.get_by_text("attention_diagnostics.md", exact=True),
                      page.get_by_text("reports/ckpt-0001/attention_diagnostics.md", exact=True))
    expect(page.get_by_role("heading", name="Attention diagnostics")).to_be_visible()
    expect(page.get_by_role("cell", name="MDI Mean")).to_be_visible()
    save(page, "mlflow_report_artifacts.png")


CHECKPOINTS = ("ckpt-0000", "ckpt-0001", "ckpt-0002")  # the base checkpoint and one per round of trained_run
ROUND_KEYS = ("ckpt-0000", "ckpt-0001")

# The Models tab's rows as the page shows them: [model name, its eval/accuracy cell]. The grid draws its pinned
# name column and the other columns as separate rows: a row's cells share its aria-rowindex, a column's header
# and cells their aria-colindex.
MODEL_ROWS_JS = """() => {
  const column = name => [...document.querySelectorAll('[role=columnheader]')]
    .find(cell => cell.innerText.trim() === name).getAttribute('aria-colindex');
  const [nameColumn, accuracyColumn] = [column('Model name'), column('eval/accuracy')];
  const rows = {};
  for (const cell of document.querySelectorAll('[role=gridcell]')) {
    const index = cell.closest('[role=row]').getAttribute('aria-rowindex');
    (rows[index] = rows[index] || {})[cell.getAttribute('aria-colindex')] = cell.innerText.trim();
  }
  return Object.values(rows).map(row => [(row[nameColumn] || '').split('\\n').pop(), row[accuracyColumn]]);
}"""


@pytest.mark.browser
def test_mlflow_run_is_finished_and_lists_a_logged_model_per_checkpoint(uis, page):
    from playwright.sync_api import expect

    open_training_run(page, uis)
    expect(page.get_by_text("Finished", exact=True)).to_be_visible()
    expect(page.get_by_text(f"Logged models ({len(CHECKPOINTS)})", exact=True)).to_be_visible()
    for key in CHECKPOINTS:
        expect(page.get_by_role("link", name=key, exact=True).first).to_be_visible()
    save(page, "mlflow_run_overview.png", full_page=True)


@pytest.mark.browser
def test_mlflow_models_tab_shows_each_checkpoint_with_its_eval_accuracy(uis, trained_run, page):
    """The experiment's Models tab: one row per checkpoint with the eval/accuracy of its state.json, and the
    chart view's eval/accuracy bars to compare them. (MLflow 3.17's Models tab sorts by creation time only: its
    sort by a metric is behind a UI feature flag that is off; test_pipeline checks the order of the search that
    sort would send.)"""
    from playwright.sync_api import expect

    from dapo_ops.store.layout import RunStore, read_json

    # Wide enough that the grid draws its metric columns, which start right of the attributes.
    page.set_viewport_size({"width": 2000, "height": 800})
    open_experiment(page, uis)
    close_assistant(page)
    page.get_by_role("link", name="Models", exact=True).click()
    expect(page.get_by_role("heading", name="Models", exact=True)).to_be_visible()
    expect(page.get_by_role("columnheader", name="eval/accuracy")).to_be_visible()
    expect(page.get_by_role("gridcell").filter(has_text=CHECKPOINTS[-1]).first).to_be_visible()
    shown = dict(page.evaluate(MODEL_ROWS_JS))
    store = RunStore(trained_run.root, trained_run.run_name)
    recorded = {key: read_json(store.checkpoint_dir(key) / "state.json")["eval"]["eval/accuracy"]
                for key in CHECKPOINTS}
    assert set(shown) == set(recorded), shown
    assert {key: float(value) for key, value in shown.items()} == pytest.approx(recorded), shown
    save(page, "mlflow_logged_models.png")

    page.locator("label", has=page.locator("input[value=CHART]")).click()
    # The chart card: the innermost element holding the title and a plot.
    chart = page.locator("div").filter(has=page.get_by_text("eval/accuracy", exact=True)).filter(
        has=page.locator(".js-plotly-plot")).last
    expect(chart.locator(".js-plotly-plot .barlayer .point")).to_have_count(len(CHECKPOINTS))  # a bar per checkpoint
    for key in CHECKPOINTS:
        expect(chart.get_by_text(key, exact=True)).to_be_visible()  # in the legend of the bars
    save(page, "mlflow_logged_models_chart.png")


ROWS_SHOW_IMAGES_JS = """() => {
  const rows = [...document.querySelectorAll('[role=row], tr')].filter(row => row.querySelector('[role=cell], td'));
  const shown = img => img.complete && img.naturalWidth > 0;
  return rows.length > 0 && rows.every(row => [...row.querySelectorAll('img')].some(shown));
}"""


@pytest.mark.browser
def test_mlflow_shows_each_round_s_rollout_table_with_its_images(uis, page):
    from playwright.sync_api import expect

    open_training_run(page, uis)
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("reports", exact=True).click()
    for opened, key in enumerate(ROUND_KEYS, start=1):
        page.get_by_text(key, exact=True).click()
        # In the tree's order the round's table is the last one its opened folders list, once the folder's
        # listing has arrived (clicking before that would open the previous round's table again).
        tables = page.get_by_text("rollout_table.json", exact=True)
        expect(tables).to_have_count(opened)
        # The round's image files, served once its table is drawn. MLflow <= 3.17 puts their get-artifact URL in
        # the <img>; 3.18 fetches them (a presigned URL first, then get-artifact) and shows blob: URLs.
        images = f"reports/{key}/rollout_images/"
        with page.expect_response(lambda response, images=images: response.ok and images in unquote(response.url)):
            tables.last.click()
        expect(page.get_by_text(f"reports/{key}/rollout_table.json", exact=True)).to_be_visible()
        expect(page.get_by_role("checkbox", name="View as table")).to_be_checked()
        headers = page.get_by_role("columnheader")
        for column in ("image", "question", "choices", "completion", "total", "advantage", "mdi/all"):
            expect(headers.filter(has_text=re.compile(rf"^{re.escape(column)}$"))).to_have_count(1)
        # Every row on the page shows its image: a decoded <img> in a cell (a cell still loading holds an icon,
        # and the page grows from one row to as many as fit).
        page.wait_for_function(ROWS_SHOW_IMAGES_JS)
        save(page, f"mlflow_rollout_table_{key}.png")


@pytest.mark.browser
def test_mlflow_run_charts_its_system_metrics(uis, page):
    from playwright.sync_api import expect

    open_training_run(page, uis)
    page.get_by_text("System metrics", exact=True).first.click()
    for metric in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        # The page draws the charts in view only: search for each, as for the model metrics.
        page.get_by_placeholder("Search metric charts").fill(metric)
        legend = page.get_by_text(f"{uis.run_name} (system/{metric})", exact=True)
        expect(legend).to_be_visible()
        # The chart card: the innermost element holding its title and the legend.
        card = page.locator("div").filter(has=page.get_by_text(metric, exact=True)).filter(has=legend).last
        expect(card.locator(".js-plotly-plot g.trace").first).to_be_attached()  # a line drawn from the samples
    save(page, "mlflow_system_metrics.png")


@pytest.mark.browser
def test_reanalysis_launched_from_the_launchpad_rewrites_the_report(uis, page):
    """Jobs → reanalysis → Open launchpad, partition ckpt-0000, config with another MDI tolerance →
    Materialize; the run succeeds and the report shows the new tolerance. (Runs last: it adds a
    materialization.)"""
    from playwright.sync_api import expect

    page.goto(f"{uis.dagster}/jobs")
    page.get_by_role("link", name="reanalysis").click()
    page.get_by_role("button", name="arrow_drop_down").click()
    page.get_by_text("Open launchpad").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text("Launchpad (configure assets)")).to_be_visible()
    # The scaffolded config has loaded (every default expanded: the editor shows its first lines).
    expect(dialog.get_by_text("experiment_name").first).to_be_visible()
    choose_partition(page, dialog, "ckpt-0000")
    # Choosing the partition reloads the scaffolded config; then replace it, as a person pasting YAML.
    dialog.get_by_text("experiment_name").first.click()
    page.keyboard.press("Control+a")
    page.keyboard.press("Delete")
    config = f"{{run_name: {uis.run_name}, reanalysis: true, mdi_tolerance: 3.5}}"
    page.keyboard.insert_text(f"resources:\n  training_config:\n    config: {config}\n")
    expect(dialog.get_by_text("reanalysis: true, mdi_tolerance: 3.5")).to_have_count(1)  # one config, both assets
    expect(dialog.get_by_text("beta")).to_have_count(0)  # nothing left of the scaffold
    expect(dialog.get_by_text("No errors")).to_be_visible()
    save(page, "dagster_launchpad_reanalysis.png")
    dialog.get_by_role("button", name="Materialize").click()

    expect(page).to_have_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    status = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
    expect(status).to_be_visible(timeout=RUN_TIMEOUT_MS)
    save(page, "dagster_reanalysis_run.png")
    assert status.inner_text() == "Success", page.locator("body").inner_text()[-3000:]

    dialog = show_markdown(page, uis.dagster, "attention_report", "ckpt-0000", "report")
    expect(dialog.get_by_text("MDI tolerance R = 3.5")).to_be_visible()
