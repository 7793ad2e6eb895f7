"""Share concept studio, the Gradio wiring of the web UI: ``share-studio`` then open http://127.0.0.1:7860

Every concept of one Share file is resident in one pipeline: pick one, mix several by weight, or
give each image of a batch its own concept; learn a new concept from 3–20 images in the background;
rename, delete or export concepts. Offline: by default the tiny base model of ``assets/`` and a
working copy of the demo Share file. Listens on 127.0.0.1 unless ``--listen``; never a public link.
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import signal
from pathlib import Path

import gradio as gr
import torch

from .engine import Studio
from .files import ROOT, read_png_metadata
from .validation import (
    BASE_CHOICE,
    MAX_BATCH,
    MAX_IMAGES,
    MIN_IMAGES,
    MIX_CHOICE,
    TRIGGER_PLACEHOLDER,
    UserError,
    check_images,
)

DEFAULT_BASE = ROOT / "assets" / "tiny-base"
DEMO_SHARE = ROOT / "assets" / "demo.share.safetensors"
DEFAULT_OUTPUTS = ROOT / "outputs" / "app"
DEFAULT_PROMPT = f"a photo of {TRIGGER_PLACEHOLDER} on a green background"
DEFAULT_GUIDANCE, MAX_GUIDANCE = 5.0, 20.0  # the slider's start and end
TINY_BASE_GUIDANCE = 1.5  # where the shipped tiny base draws learned concepts best (README, "The tiny base")
DEFAULT_CAPTION = f"a photo of {TRIGGER_PLACEHOLDER}"
POLL_SECONDS = 1.0

CSS = """
#header { margin-bottom: 0; }
#header p { margin: 0; }
.concept-list { max-height: 460px; overflow-y: auto; }
.learn-bar { height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; }
.learn-bar > div { height: 100%; background: var(--primary-500); transition: width .4s; }
.learn-text { font-size: var(--text-sm); margin-top: 4px; color: var(--body-text-color-subdued); }
#generate { min-height: 64px; font-size: var(--text-xl); }
.concepts-title p { margin: 0; }
#gallery img, #learn-preview img, #learn-thumbs img { image-rendering: pixelated; }
#learn-preview img { width: 100%; height: 100%; object-fit: contain; }
"""


# -- formatting --------------------------------------------------------------------------------------


def kb(n: int) -> str:
    return f"{n / 1000:.1f} kB" if n < 1_000_000 else f"{n / 1e6:.2f} MB"


def header_markdown(studio: Studio) -> str:
    loaded, s = studio.loaded, studio.summary()
    base = f'<code title="{html.escape(str(studio.base.resolve()))}">{html.escape(studio.base.name)}</code>'
    path = f'<code title="{html.escape(str(studio.share_path.resolve()))}">{html.escape(studio.share_path.name)}</code>'
    if loaded.state is None:
        share = f"{path} — no file yet: learn a concept to create it"
    else:
        share = (f"{path} — **{s['concepts']} concepts, all resident**, {kb(s['file_bytes'])}"
                 + (f" ({studio.note})" if studio.note else ""))
    text = f"### Share concept studio\nBase {base} · Share file {share} · {studio.device}"
    if loaded.error:
        text += f"\n\n⚠ **The Share file on disk cannot be loaded; the previous version is in use:** {loaded.error}"
    return text


def summary_markdown(studio: Studio) -> str:
    s = studio.summary()
    if studio.loaded.state is None:
        return f"No Share file at `{studio.share_path}` yet. Learn a concept to create it."
    n = s["concepts"]
    each = f" (~{kb(s['concept_bytes'] // n)} each)" if n else ""
    return (
        f"`{studio.share_path.resolve()}`: {n} concepts in {kb(s['file_bytes'])}. "
        f"Shared basis {kb(s['basis_bytes'])} ({s['layers']} layers, k = {s['k_min']}–{s['k_max']} directions each); "
        f"all concept coefficients together {kb(s['concept_bytes'])}{each}. "
        f"As separate LoRA files of the same rank they would take {kb(s['lora_bytes'])}."
    )


def md(text) -> str:
    """A name or other file-borne text as literal Markdown: names from folded-in or old files may hold
    anything, and Gradio renders Markdown's inline HTML."""
    escaped = html.escape(str(text), quote=False)
    return "".join("\\" + ch if ch in "\\`*[]|" else ch for ch in escaped)


def fmt_error(e: float) -> str:
    return "0" if e < 5e-7 else f"{e:.1e}" if e < 1e-3 else f"{e:.4f}"


def manage_rows(studio: Studio) -> list[list]:
    rows = []
    for c in studio.concepts():
        errors = c["merge_errors"]
        history = " → ".join(map(fmt_error, errors[-6:]))
        if len(errors) > 6:
            history = "… → " + history
        rows.append([c["name"], c["trigger"] or "", (c["date"] or "")[:16].replace("T", " "), c["steps"] or "",
                     c["num_images"] or "", c["bytes"], c["lora_bytes"], history])
    return rows


MANAGE_HEADERS = ["Concept", "Trigger", "Learned", "Steps", "Images", "Bytes in file", "Bytes as LoRA", "Merge error after each merge"]


def report_markdown(report: dict | None, new: str | None = None, title: str = "What the merge did to every concept") -> str:
    if not report:
        return ""
    fmt = lambda v: "–" if v is None else f"{v:.4f}"
    lines = [f"**{title}** (merge error = ‖ΔW − ΔŴ‖/‖ΔW‖, data-free forgetting)", "",
             "| concept | merge error | held-out loss before | after |", "|---|---|---|---|"]
    for name, e in report.get("concepts", {}).items():
        mark = " (new)" if name == new else ""
        error = "–" if e.get("merge_error") is None else fmt_error(e["merge_error"])
        lines.append(f"| {md(name)}{mark} | {error} | {fmt(e.get('heldout_loss_before'))} | {fmt(e.get('heldout_loss_after'))} |")
    return "\n".join(lines)


def job_html(view: dict) -> str:
    state = view["state"]
    if state == "idle":
        return ""
    done = state in ("done", "failed", "cancelled")
    fraction = 1.0 if state == "done" else (view["step"] / view["max_steps"] if view["max_steps"] else 0.0)
    loss = f" · loss {view['loss']:.4f}" if isinstance(view.get("loss"), (int, float)) else ""
    label = {"starting": "starting (loading the model)…", "training": "training", "merging": "merging into the Share file…",
             "cancelling": "cancelling…", "done": "done", "failed": "failed", "cancelled": "cancelled"}.get(state, state)
    eta = f" · about {view['eta']:.0f} s left" if view.get("eta") is not None else ""
    text = f"{html.escape(view['name'])}: {label} · step {view['step']}/{view['max_steps']}{loss} · {view['elapsed']:.0f} s{eta}"
    return (f'<div class="learn-bar" role="progressbar" aria-valuenow="{fraction * 100:.0f}" aria-valuemin="0" '
            f'aria-valuemax="100" data-state="{state}" id="learn-bar"><div style="width:{fraction * 100:.1f}%"></div></div>'
            f'<div class="learn-text" id="learn-text" data-state="{state}" data-done="{str(done).lower()}">{text}</div>')


def job_status(view: dict) -> str:
    if view["state"] == "idle":
        return f"Upload {MIN_IMAGES}–{MAX_IMAGES} images, name the concept, give it a trigger word, press **Learn**."
    if view.get("message"):
        icon = {"done": "✓", "failed": "✗", "cancelled": "■"}.get(view["state"], "")
        return f"{icon} {view['message']}"
    return (f"Learning **{md(view['name'])}** (trigger {md(view['trigger'])}, caption “{md(view['caption'])}”). "
            "Generating still works meanwhile (with the current file).")


# -- the UI --------------------------------------------------------------------------------------------


def error_to_ui(fn):
    """Turn `UserError` into a Gradio error toast (the message as is)."""

    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise gr.Error(str(e), duration=None, title="Cannot do that") from None

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


def parse_selection(text):
    """The API's selection: JSON (a name, a {name: weight} mix, null, or a list of those per image), or a bare name."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def pick_selection(pick, mix: dict):
    """One image's dropdown choice in per-image mode: the base model, the slider mix, or one concept at weight 1."""
    if pick in (None, "", BASE_CHOICE):
        return None
    if pick == MIX_CHOICE:
        return mix or None
    return {pick: 1.0}


def served(component, path) -> str:
    """A copy of an output file in Gradio's cache, under a folder named by its content's hash: the
    only way an output reaches the browser. The outputs folder itself is never served."""
    return component.move_resource_to_block_cache(str(path))


def never_served(studio: Studio) -> list[str]:
    """What the file route must refuse whatever else allows it: the outputs folder (uploads copied
    for learn jobs, their logs and commands, exports, saved images), the Share file and its card."""
    share = studio.share_path.resolve()
    paths = [studio.outputs.resolve(), share, share.parent / "README.md", share.with_name(share.stem + ".README.md")]
    return [str(p) for p in paths]


def build_ui(studio: Studio, default_prompt: str = DEFAULT_PROMPT, default_guidance: float = DEFAULT_GUIDANCE) -> gr.Blocks:
    size = studio.native_size
    samplers = studio.sampler_choices()

    with gr.Blocks(title="Share concept studio") as demo:
        version = gr.State(studio.loaded.version)
        concepts = gr.State(studio.concepts())
        job_seen = gr.State(None)
        last_seed = gr.State(None)
        header = gr.Markdown(header_markdown(studio), elem_id="header")

        with gr.Tabs():
            # ---------------------------------------------------------------- Generate
            with gr.Tab("Generate", id="generate"):
                with gr.Row(equal_height=True):
                    with gr.Column(scale=6):
                        prompt = gr.Textbox(label="Prompt", value=default_prompt, lines=1, elem_id="prompt",
                                            info=f"{TRIGGER_PLACEHOLDER} becomes the trigger words of each image's concepts")
                        negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                    with gr.Column(scale=1, min_width=170):
                        generate_btn = gr.Button("Generate", variant="primary", size="lg", elem_id="generate")
                        reset_btn = gr.Button("All weights to 0", size="sm", elem_id="reset-weights")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4):
                        gr.Markdown("**Concepts**: every concept of the file is loaded. A weight ≠ 0 uses it, several "
                                    "make a mix; switching is instant.", elem_classes=["concepts-title"])
                        with gr.Column(elem_classes=["concept-list"]):

                            @gr.render(inputs=[concepts], triggers=[concepts.change, demo.load])
                            def concept_picker(rows):
                                if not rows:
                                    gr.Markdown("*No concepts yet: learn one in the **Learn** tab. The base model is used.*")
                                sliders = [
                                    gr.Slider(-1, 2, value=0, step=0.05, label=r["name"],
                                              info=f"trigger: {r['trigger'] or '–'}", key=("weight", r["name"]),
                                              elem_id=f"weight-{i}", elem_classes=["concept-weight"], buttons=[])
                                    for i, r in enumerate(rows)
                                ]
                                names = [r["name"] for r in rows]

                                def run(prompt_, negative_, per_image_, steps_, guidance_, seed_, width_, height_, batch_, sampler_, *rest):
                                    picks, weights = rest[:MAX_BATCH], rest[MAX_BATCH:]
                                    mix = {n: w for n, w in zip(names, weights) if w}
                                    if per_image_:
                                        selection = [pick_selection(p, mix) for p in picks[: int(batch_)]]
                                    else:
                                        selection = mix or None
                                    return generate(prompt_, negative_, selection, steps_, guidance_, seed_, width_, height_, batch_, sampler_)

                                gr.on([generate_btn.click, prompt.submit], error_to_ui(run),
                                      inputs=[prompt, negative, per_image, steps, guidance, seed, width, height, batch, sampler,
                                              *image_picks, *sliders],
                                      outputs=[gallery, info, last_seed], api_visibility="private",
                                      concurrency_id="generate", concurrency_limit=4)
                                reset_btn.click(lambda: [0] * len(sliders), outputs=sliders, api_visibility="private", queue=False)

                        per_image = gr.Checkbox(label="One concept per image (one batch, each image its own selection)",
                                                value=False, elem_id="per-image")
                        with gr.Row(visible=False) as picks_row:
                            image_picks = [gr.Dropdown(choices=[BASE_CHOICE, MIX_CHOICE], value=BASE_CHOICE, label=f"Image {i + 1}",
                                                       visible=i < 4, elem_id=f"image-pick-{i}", min_width=140, interactive=True)
                                           for i in range(MAX_BATCH)]
                        with gr.Accordion("Settings", open=True):
                            with gr.Row():
                                steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="steps", buttons=[])
                                guidance = gr.Slider(0, MAX_GUIDANCE, value=default_guidance, step=0.5, label="Guidance",
                                                     elem_id="guidance", buttons=[])
                            with gr.Row():
                                lo, hi = (64 if size >= 64 else 8), max(1024, size)
                                width = gr.Slider(lo, hi, value=size, step=8, label="Width", elem_id="width", buttons=[])
                                height = gr.Slider(lo, hi, value=size, step=8, label="Height", elem_id="height", buttons=[])
                            with gr.Row():
                                batch = gr.Slider(1, MAX_BATCH, value=4, step=1, label="Batch size", elem_id="batch", buttons=[])
                                sampler = gr.Dropdown(samplers, value=samplers[0], label="Sampler", elem_id="sampler", min_width=160)
                            with gr.Row(equal_height=True):
                                seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id="seed", min_width=120)
                                reuse_seed = gr.Button("♻ last seed", size="sm", min_width=70, scale=0)
                    with gr.Column(scale=5):
                        gallery = gr.Gallery(label="Images", columns=4, height="auto", format="png", object_fit="contain",
                                             elem_id="gallery", buttons=["download", "fullscreen"], preview=False)
                        info = gr.Markdown(elem_id="generate-info")
                        with gr.Accordion("Read the settings of a saved image (PNG info)", open=False):
                            png_in = gr.File(label="A PNG made here", file_count="single", elem_id="png-info-file")
                            png_out = gr.Code(label="Its text chunks", language="json", elem_id="png-info")

                # hidden: the generation API (selection as JSON), for scripts and gradio_client
                selection_json = gr.Textbox(visible=False)
                api_generate = gr.Button(visible=False)
                api_generate.click(
                    error_to_ui(lambda p, n, s, st, g, se, w, h, b, sa: generate(p, n, parse_selection(s), st, g, se, w, h, b, sa)),
                    inputs=[prompt, negative, selection_json, steps, guidance, seed, width, height, batch, sampler],
                    outputs=[gallery, info, last_seed], api_name="generate", concurrency_id="generate", concurrency_limit=4,
                    api_description="Generate images. selection: JSON — a concept name, a {name: weight} mix, null, "
                                    "or a list with one of those per image.",
                )

                def generate(prompt_, negative_, selection, steps_, guidance_, seed_, width_, height_, batch_, sampler_):
                    result = studio.generate(prompt_, negative_, selection, steps_, guidance_, seed_, width_, height_, batch_, sampler_)
                    return [(served(gallery, p), c) for p, c in zip(result.paths, result.captions)], result.info, result.seeds[0]

                def show_picks(on, n):
                    return [gr.update(visible=on)] + [gr.update(visible=i < int(n)) for i in range(MAX_BATCH)]

                gr.on([per_image.change, batch.change], show_picks, inputs=[per_image, batch], outputs=[picks_row, *image_picks],
                      api_visibility="private", queue=False)
                reuse_seed.click(lambda s: -1 if s is None else s, inputs=last_seed, outputs=seed, api_visibility="private", queue=False)

                def png_info(file):
                    if not file:
                        return ""
                    try:
                        meta = read_png_metadata(file)
                    except Exception as e:  # noqa: BLE001 — any unreadable upload
                        raise gr.Error(f"{Path(file).name} is not a readable PNG: {e}") from None
                    if not meta:
                        return "// no text chunks in this image"
                    return json.dumps(meta, indent=2, ensure_ascii=False)

                png_in.change(png_info, inputs=png_in, outputs=png_out, api_visibility="private")

            # ---------------------------------------------------------------- Learn
            with gr.Tab("Learn", id="learn"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4):
                        files = gr.File(label=f"Images of the concept ({MIN_IMAGES}–{MAX_IMAGES})", file_count="multiple",
                                        elem_id="learn-files", height=160)
                        upload_check = gr.Markdown(elem_id="upload-check")
                        thumbs = gr.Gallery(label="Uploaded images", columns=6, height=170, show_label=False,
                                            elem_id="learn-thumbs", interactive=False)
                    with gr.Column(scale=3):
                        name = gr.Textbox(label="Concept name", placeholder="my-dog", elem_id="learn-name",
                                          info="letters, digits, - and _")
                        trigger = gr.Textbox(label="Trigger word", placeholder="sks", elem_id="learn-trigger",
                                             info="a rare word that will stand for the concept in prompts")
                        caption = gr.Textbox(label="Caption of the images", value=DEFAULT_CAPTION, elem_id="learn-caption")
                        train_steps = gr.Slider(2, 2000, value=200, step=1, label="Training steps", elem_id="learn-steps")
                        with gr.Row():
                            learn_btn = gr.Button("Learn concept", variant="primary", elem_id="learn")
                            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                    with gr.Column(scale=4):
                        progress = gr.HTML(elem_id="learn-progress")
                        status = gr.Markdown(job_status(studio.job_view()), elem_id="learn-status")
                        preview = gr.Image(label="Preview (the concept so far)", type="filepath", interactive=False,
                                           height=220, elem_id="learn-preview", buttons=[])
                        report = gr.Markdown(elem_id="learn-report")

                def check_upload(paths):
                    if not paths:
                        return "", []
                    try:
                        good = check_images(paths)
                    except UserError as e:
                        return f"✗ {e}", []
                    return f"✓ {len(good)} images, ready.", [str(g.path) for g in good]

                files.change(check_upload, inputs=files, outputs=[upload_check, thumbs], api_visibility="private")

                def start_learn(paths, name_, trigger_, caption_, steps_):
                    job = studio.start_learn(paths, name_, trigger_, caption_, steps_)
                    return f"Started learning **{job.name}** ({job.steps} steps)…"

                learn_btn.click(error_to_ui(start_learn), inputs=[files, name, trigger, caption, train_steps], outputs=status,
                                api_name="learn", concurrency_id="files")
                cancel_btn.click(lambda: studio.cancel_learn(), outputs=status, api_name="cancel_learn")

            # ---------------------------------------------------------------- Manage
            with gr.Tab("Manage", id="manage"):
                summary = gr.Markdown(summary_markdown(studio), elem_id="manage-summary")
                table = gr.Dataframe(value=manage_rows(studio), headers=MANAGE_HEADERS, interactive=False, wrap=True,
                                     elem_id="manage-table", show_search="search",
                                     datatype=["str", "str", "str", "number", "number", "number", "number", "str"])
                with gr.Row():
                    target = gr.Dropdown(choices=studio.loaded.names, value=None, label="Concept", elem_id="manage-target",
                                         allow_custom_value=True)  # checked by the studio: choices change with the file
                    new_name = gr.Textbox(label="New name", elem_id="manage-new-name")
                    rename_btn = gr.Button("Rename", elem_id="rename")
                with gr.Row():
                    delete_btn = gr.Button("Delete…", variant="stop", elem_id="delete")
                    export_btn = gr.Button("Export as a Diffusers LoRA file", elem_id="export")
                with gr.Row(visible=False) as confirm_row:
                    confirm_text = gr.Markdown()
                    confirm_yes = gr.Button("Yes, delete it", variant="stop", elem_id="delete-yes")
                    confirm_no = gr.Button("Keep it", elem_id="delete-no")
                manage_msg = gr.Markdown(elem_id="manage-message")
                export_file = gr.File(label="LoRA file (pipe.load_lora_weights loads it)", interactive=False, elem_id="export-file",
                                      height=90)

                def after_change(message):
                    return message, studio.loaded.version, studio.concepts()

                def do_rename(old, new):
                    return after_change("✓ " + studio.rename(old, new))

                def ask_delete(name_):
                    if not name_:
                        raise gr.Error("Pick the concept to delete.")
                    return (gr.update(visible=True),
                            f"Delete **{md(name_)}**? The shared basis is refit to the other concepts (their merge errors are shown after).")

                def do_delete(name_):
                    errors = studio.delete(name_)
                    rows = "\n".join(f"| {md(n)} | {fmt_error(e)} |" for n, e in errors.items())
                    message = f"✓ Deleted {md(repr(name_))}; the basis was refit to the others.\n\n| concept | merge error |\n|---|---|\n{rows}"
                    return (gr.update(visible=False), *after_change(message))

                def do_export(name_):
                    path = studio.export_lora(name_)
                    return (f"✓ {md(repr(name_))} as a Diffusers LoRA file: {md(path.name)} ({kb(path.stat().st_size)}).",
                            served(export_file, path))

                rename_btn.click(error_to_ui(do_rename), inputs=[target, new_name], outputs=[manage_msg, version, concepts],
                                 api_name="rename", concurrency_id="files")
                delete_btn.click(error_to_ui(ask_delete), inputs=target, outputs=[confirm_row, confirm_text], api_visibility="private")
                confirm_no.click(lambda: gr.update(visible=False), outputs=confirm_row, api_visibility="private")
                confirm_yes.click(error_to_ui(do_delete), inputs=target, outputs=[confirm_row, manage_msg, version, concepts],
                                  api_name="delete", concurrency_id="files")
                export_btn.click(error_to_ui(do_export), inputs=target, outputs=[manage_msg, export_file], api_name="export_lora")

        # hidden API helpers
        concepts_json, job_json = gr.JSON(visible=False), gr.JSON(visible=False)
        api_concepts, api_job = gr.Button(visible=False), gr.Button(visible=False)
        api_concepts.click(lambda: studio.concepts(), outputs=concepts_json, api_name="concepts", queue=False)
        api_job.click(lambda: studio.job_view(), outputs=job_json, api_name="learn_status", queue=False)

        # -- keeping every session up to date: new file versions, the learn job --------------------------
        def refresh_views(rows, target_, *picks, keep=True):
            """Everything that lists the concepts; choices still valid are kept (``keep``), others reset."""
            names = [r["name"] for r in rows]
            choices = [BASE_CHOICE, MIX_CHOICE, *names]
            default = lambda i: names[i % len(names)] if names else BASE_CHOICE
            picks = [gr.update(choices=choices, value=p if keep and p in choices else default(i)) for i, p in enumerate(picks)]
            return (header_markdown(studio), summary_markdown(studio), manage_rows(studio),
                    gr.update(choices=names, value=target_ if keep and target_ in names else None), *picks)

        views = dict(inputs=[concepts, target, *image_picks], outputs=[header, summary, table, target, *image_picks],
                     api_visibility="private", concurrency_limit=None)
        concepts.change(refresh_views, **views)
        demo.load(lambda *a: refresh_views(*a, keep=False), **views)

        def poll(seen_version, seen_job):
            studio.sync(block=False)
            loaded = studio.loaded
            view = studio.job_view()
            key = [view["state"], view.get("step"), view.get("preview_mtime"), view.get("message"), int(view.get("elapsed", 0))]
            out = [gr.skip()] * 9
            if loaded.version != seen_version:
                out[0], out[1] = loaded.version, studio.concepts()
            if key != seen_job:
                running = view["state"] not in ("idle", "done", "failed", "cancelled")
                out[2:] = [key, job_html(view), job_status(view), served(preview, view["preview"]) if view.get("preview") else None,
                           report_markdown(view.get("report"), view.get("name")),
                           gr.update(interactive=not running), gr.update(interactive=running)]
            return out

        timer = gr.Timer(POLL_SECONDS)
        poll_outputs = [version, concepts, job_seen, progress, status, preview, report, learn_btn, cancel_btn]
        # queued (State.change only fires for queued events), but never waiting behind a generation
        timer.tick(poll, inputs=[version, job_seen], outputs=poll_outputs, api_visibility="private", show_progress="hidden",
                   concurrency_limit=None, trigger_mode="always_last")
        demo.load(poll, inputs=[version, job_seen], outputs=poll_outputs, api_visibility="private", show_progress="hidden",
                  concurrency_limit=None)
    return demo


# -- command line ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default=str(DEFAULT_BASE), help="Base pipeline folder (Diffusers format, local).")
    p.add_argument("--share", default=None,
                   help="The Share file to use and edit (created by the first learned concept if absent). Default: a "
                        f"working copy of {DEMO_SHARE.relative_to(ROOT)} in the outputs folder, so the shipped file is never changed.")
    p.add_argument("--outputs", default=str(DEFAULT_OUTPUTS), help="Where images, learn jobs and exports go.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, mps, …")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="auto: float16 on CUDA, else float32.")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="The prompt the page starts with.")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"The guidance scale the page starts with (default: {TINY_BASE_GUIDANCE:g} on the shipped tiny base, "
                        f"which draws learned concepts best there; {DEFAULT_GUIDANCE:g} on another base).")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--listen", action="store_true", help="Listen on all interfaces (0.0.0.0), not only 127.0.0.1.")
    p.add_argument("--no-warmup", action="store_true", help="Skip the tiny warm-up generation at start.")
    args = p.parse_args(argv)
    if args.guidance is None:
        args.guidance = TINY_BASE_GUIDANCE if Path(args.base).resolve() == DEFAULT_BASE.resolve() else DEFAULT_GUIDANCE
    return args


def resolve_share(args) -> tuple[Path, str | None]:
    if args.share:
        return Path(args.share), None
    path = Path(args.outputs) / "share.safetensors"
    if not path.exists() and DEMO_SHARE.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEMO_SHARE, path)
    note = f"a working copy of {DEMO_SHARE.relative_to(ROOT)}" if DEMO_SHARE.is_file() else None
    return path, note


def main(argv=None):
    args = parse_args(argv)
    if not 0 <= args.guidance <= MAX_GUIDANCE:
        raise SystemExit(f"share-studio: error: --guidance must be between 0 and {MAX_GUIDANCE:g}, got {args.guidance:g}.")
    if not (Path(args.base) / "model_index.json").is_file():
        raise SystemExit(f"share-studio: error: {args.base} is not a Diffusers pipeline folder (no model_index.json); pass --base PATH.")
    share, note = resolve_share(args)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        studio = Studio(args.base, share, args.outputs, device=args.device, dtype=dtype, note=note)
    except UserError as e:
        raise SystemExit(f"share-studio: error: {e}") from None
    if not args.no_warmup:
        studio.warmup()

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    demo = build_ui(studio, args.prompt, args.guidance)
    demo.queue(default_concurrency_limit=1)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    print(f"Share concept studio: base {studio.base}, Share file {studio.share_path} "
          f"({len(studio.loaded.names)} concepts), device {studio.device}", flush=True)
    try:
        demo.launch(server_name=host, server_port=args.port, share=False, show_error=True, inbrowser=False,
                    blocked_paths=never_served(studio), theme=gr.themes.Soft(
                        primary_hue="indigo", font=["ui-sans-serif", "system-ui", "sans-serif"],
                        font_mono=["ui-monospace", "monospace"]),
                    css=CSS, footer_links=["api"], ssr_mode=False, mcp_server=False, max_file_size="100mb")
    except KeyboardInterrupt:
        pass
    finally:
        studio.close()
        demo.close()
