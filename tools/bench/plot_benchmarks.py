#!/usr/bin/env python3
"""Draw the layer_bench results as an SVG figure for docs/benchmarks.md.

Reads the JSON that bench/layer_bench writes with --benchmark_out_format=json,
--benchmark_repetitions=N (N >= 2) and --benchmark_report_aggregates_only=true, keeps the
median of each benchmark and draws two panels, one above the other:

  1. copy_fraction of fused_forward, fused_forward_backward and fused_forward_backward_kept in
     float on 2 threads, or on the highest thread count present, grouped by stream count n.
     copy_fraction is the minimal traffic per second divided by the std::memcpy bandwidth for
     the same bytes and threads. Dashed lines mark the targets of 0.8 (forward) and 0.7
     (forward + backward).
  2. the speed-up of the fused kernels over the reference kernels on 1 thread (reference
     real_time divided by fused real_time) for forward, backward and forward + backward.

Each group of bars shows one shape per n: the shape that most kernels of the panel have, and
among those C = 2048, T = 4096 where present, otherwise the largest C * T. The group label shows
the shape. Kernels or shapes missing from the file are left out with a note on stderr.

Needs only the standard library of Python 3.9 or newer.

Example:
    tools/bench/plot_benchmarks.py build/bench-results/layer_bench.json docs/images/benchmarks.svg
"""

import argparse
import collections
import json
import math
import sys
from xml.sax.saxutils import escape, quoteattr

PROGRAM = "plot_benchmarks.py"

# The shape that the tables of docs/benchmarks.md quote. A group shows it unless another shape
# at that n has more of the panel's kernels.
HEADLINE_SHAPE = (2048, 4096)  # (C, T)

COPY_FRACTION_KERNELS = ["fused_forward", "fused_forward_backward", "fused_forward_backward_kept"]
COPY_FRACTION_THREADS = 2
COPY_FRACTION_TARGETS = [(0.8, "forward", "target 0.8"), (0.7, "forward+backward", "target 0.7")]

# Kernel label, fused family, reference family.
SPEEDUP_PAIRS = [
    ("forward", "fused_forward", "reference_forward"),
    ("backward", "fused_backward", "reference_backward"),
    ("forward_backward", "fused_forward_backward", "reference_forward_backward"),
]
SPEEDUP_THREADS = 1

STORAGE = "float"

# Okabe-Ito colours, which stay distinct under the common forms of colour blindness. Both panels
# give a kernel the same colour.
COLORS = {
    "forward": "#0072B2",
    "forward_backward": "#E69F00",
    "forward_backward_kept": "#009E73",
    "backward": "#CC79A7",
}

TIME_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}

# Figure geometry in px.
FIGURE_WIDTH = 900
PANEL_HEIGHT = 500
TITLE_HEIGHT = 44
CAPTION_HEIGHT = 40
PLOT_LEFT = 80
PLOT_RIGHT = FIGURE_WIDTH - 140  # the right margin carries the target labels
PLOT_TOP = 78  # below the panel title and the legend
PLOT_BOTTOM = PANEL_HEIGHT - 72  # above the group labels and the x axis label


class InputError(Exception):
    """An input file that cannot be read or contains no usable medians."""


# counters: every numeric field of the JSON entry, the user counters such as copy_fraction included.
Median = collections.namedtuple("Median", "family storage arguments real_seconds counters")

Series = collections.namedtuple("Series", "label color values")  # values: one per group, or None

Panel = collections.namedtuple(
    "Panel", "title y_label groups series y_max value_format reference_lines empty_message")


def note(message):
    print(f"{PROGRAM}: note: {message}", file=sys.stderr)


def count_threads(count):
    return f"{count} thread" if count == 1 else f"{count} threads"


# ---------------------------------------------------------------------------------------------
# Reading the JSON file.

def load_benchmark_json(path):
    """Return the "context" object and the "benchmarks" list of a Google Benchmark JSON file."""
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text: {error}") from error
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON: {error}") from error

    if not isinstance(document, dict) or not isinstance(document.get("benchmarks"), list):
        raise InputError(f"{path} has no \"benchmarks\" list; expected the output of "
                         "layer_bench --benchmark_out=FILE --benchmark_out_format=json")
    context = document.get("context")
    return (context if isinstance(context, dict) else {}), document["benchmarks"]


def parse_run_name(run_name):
    """Split "family/storage/key:value/..." into the family, the storage type and the arguments.

    Parts without a colon after the storage type, such as the "real_time" that UseRealTime()
    appends, are ignored. Raises ValueError on a name of fewer than two parts or a non-integer
    argument value.
    """
    parts = run_name.split("/")
    if len(parts) < 2:
        raise ValueError("expected at least family/storage")
    arguments = {}
    for part in parts[2:]:
        if ":" in part:
            key, value = part.split(":", 1)
            arguments[key] = int(value)
    return parts[0], parts[1], arguments


def read_medians(path):
    """Return the context and the median entries of a layer_bench JSON file as Median tuples."""
    context, entries = load_benchmark_json(path)
    medians = []
    skipped = 0
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("aggregate_name") != "median":
            continue
        name = entry.get("name", "?")
        run_name = entry.get("run_name") or name.removesuffix("_median")
        if entry.get("error_occurred"):
            note(f"{name} reports an error ({entry.get('error_message', 'no message')}); skipped")
            skipped += 1
            continue
        try:
            family, storage, arguments = parse_run_name(run_name)
            real_seconds = float(entry["real_time"]) * TIME_UNIT_SECONDS[entry.get("time_unit", "ns")]
        except (KeyError, TypeError, ValueError) as error:
            note(f"{name} has an invalid name, real_time or time_unit ({error!r}); skipped")
            skipped += 1
            continue
        counters = {key: value for key, value in entry.items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool)}
        medians.append(Median(family, storage, arguments, real_seconds, counters))

    if not medians:
        detail = f" ({skipped} median entries were invalid)" if skipped else ""
        raise InputError(f"{path} has no median entries{detail}; run layer_bench with "
                         "--benchmark_repetitions=N (N >= 2) --benchmark_report_aggregates_only=true")
    return context, medians


def index_layer_medians(medians):
    """Map (family, storage, n, C, T, threads) to the median of each layer benchmark."""
    index = {}
    for median in medians:
        try:
            key = (median.family, median.storage, median.arguments["n"], median.arguments["C"],
                   median.arguments["T"], median.arguments["threads"])
        except KeyError:
            continue  # not a layer benchmark, for example mlp_residual, which has no n
        if key in index:
            continue  # the first median wins, see main()
        index[key] = median
    return index


# ---------------------------------------------------------------------------------------------
# Choosing what each panel shows.

def pick_shape(shape_counts):
    """Return the (C, T) to draw for one n, given how many kernels of a panel have each shape."""
    def preference(shape):
        channels, tokens = shape
        return (shape_counts[shape], shape == HEADLINE_SHAPE, channels * tokens, channels)
    return max(shape_counts, key=preference)


def group_labels(shapes):
    return [(f"n = {n}", f"C {channels}, T {tokens}") for n, (channels, tokens) in shapes]


def build_copy_fraction_panel(index):
    """Collect the copy_fraction bars of the float fused forward kernels.

    Returns the panel and the thread count it uses. The thread count is None when the input has
    none of these kernels.
    """
    entries = {key: median for key, median in index.items()
               if key[0] in COPY_FRACTION_KERNELS and key[1] == STORAGE
               and "copy_fraction" in median.counters}
    thread_counts = sorted({key[5] for key in entries})
    title = f"Fraction of memory-copy bandwidth, {STORAGE} fused kernels"
    if not thread_counts:
        note(f"no {STORAGE} median with copy_fraction for {', '.join(COPY_FRACTION_KERNELS)}; "
             "the copy-fraction panel is empty")
        return empty_panel(title, "copy_fraction", "no fused forward kernels in the input"), None

    threads = COPY_FRACTION_THREADS if COPY_FRACTION_THREADS in thread_counts else thread_counts[-1]
    if threads != COPY_FRACTION_THREADS:
        note(f"no copy_fraction on {count_threads(COPY_FRACTION_THREADS)}; using {count_threads(threads)}")
    entries = {key: median for key, median in entries.items() if key[5] == threads}

    kernels = [kernel for kernel in COPY_FRACTION_KERNELS if any(key[0] == kernel for key in entries)]
    for kernel in COPY_FRACTION_KERNELS:
        if kernel not in kernels:
            note(f"no {STORAGE} median of {kernel} on {count_threads(threads)}; "
                 "left out of the copy-fraction panel")

    shapes_by_n = collections.defaultdict(collections.Counter)
    for _, _, n, channels, tokens, _ in entries:
        shapes_by_n[n][(channels, tokens)] += 1
    shapes = [(n, pick_shape(shapes_by_n[n])) for n in sorted(shapes_by_n)]

    series = []
    for kernel in kernels:
        values = []
        for n, (channels, tokens) in shapes:
            median = entries.get((kernel, STORAGE, n, channels, tokens, threads))
            if median is None:
                note(f"no {STORAGE} median of {kernel} at n={n}, C={channels}, T={tokens} "
                     f"on {count_threads(threads)}; its bar is left out")
            values.append(None if median is None else float(median.counters["copy_fraction"]))
        series.append(Series(kernel, COLORS[kernel.removeprefix("fused_")], values))

    largest = max(value for entry in series for value in entry.values if value is not None)
    panel = Panel(
        title=f"{title}, {count_threads(threads)} (higher is better)",
        y_label="copy_fraction",
        groups=group_labels(shapes),
        series=series,
        y_max=max(1.1, round_up(largest * 1.08, 0.1)),
        value_format=lambda value: f"{value:.2f}",
        reference_lines=COPY_FRACTION_TARGETS,
        empty_message=None,
    )
    return panel, threads


def build_speedup_panel(index):
    """Collect the speed-ups of the fused kernels over the reference kernels.

    Returns the panel and the thread count it uses. The thread count is None when no fused
    kernel has a reference median of the same shape and thread count.
    """
    pairs = {}  # (label, n, C, T, threads) -> speed-up
    for label, fused_family, reference_family in SPEEDUP_PAIRS:
        for key, fused in index.items():
            if key[0] != fused_family or key[1] != STORAGE:
                continue
            reference = index.get((reference_family,) + key[1:])
            if reference is not None and fused.real_seconds > 0 and reference.real_seconds > 0:
                pairs[(label,) + key[2:]] = reference.real_seconds / fused.real_seconds

    title = f"Speed-up of the fused over the reference kernels, {STORAGE}"
    thread_counts = sorted({key[4] for key in pairs})
    if not thread_counts:
        note(f"no {STORAGE} fused kernel has a reference median of the same shape and thread count; "
             "the speed-up panel is empty")
        return empty_panel(title, "speed-up (reference time / fused time)",
                           "no pairs of fused and reference kernels in the input"), None

    threads = SPEEDUP_THREADS if SPEEDUP_THREADS in thread_counts else thread_counts[0]
    if threads != SPEEDUP_THREADS:
        note(f"no fused and reference pair on {count_threads(SPEEDUP_THREADS)}; using {count_threads(threads)}")
    pairs = {key: value for key, value in pairs.items() if key[4] == threads}

    labels = [label for label, _, _ in SPEEDUP_PAIRS if any(key[0] == label for key in pairs)]
    for label, fused_family, reference_family in SPEEDUP_PAIRS:
        if label not in labels:
            note(f"no {STORAGE} medians of both {fused_family} and {reference_family} on "
                 f"{count_threads(threads)} at one shape; left out of the speed-up panel")

    fused_families = {fused_family for _, fused_family, _ in SPEEDUP_PAIRS}
    fused_streams = {key[2] for key in index
                     if key[0] in fused_families and key[1] == STORAGE and key[5] == threads}
    for n in sorted(fused_streams - {key[1] for key in pairs}):
        note(f"no reference median matches a fused one at n={n} on {count_threads(threads)}; "
             f"n={n} is left out of the speed-up panel")

    shapes_by_n = collections.defaultdict(collections.Counter)
    for _, n, channels, tokens, _ in pairs:
        shapes_by_n[n][(channels, tokens)] += 1
    shapes = [(n, pick_shape(shapes_by_n[n])) for n in sorted(shapes_by_n)]

    series = []
    for label in labels:
        values = []
        for n, (channels, tokens) in shapes:
            value = pairs.get((label, n, channels, tokens, threads))
            if value is None:
                note(f"no {label} speed-up at n={n}, C={channels}, T={tokens} on "
                     f"{count_threads(threads)}; its bar is left out")
            values.append(value)
        series.append(Series(label, COLORS[label], values))

    largest = max(value for entry in series for value in entry.values if value is not None)
    panel = Panel(
        title=f"{title}, {count_threads(threads)} (higher is better)",
        y_label="speed-up (reference time / fused time)",
        groups=group_labels(shapes),
        series=series,
        y_max=nice_ceiling(max(1.2, largest * 1.1)),
        value_format=format_speedup,
        reference_lines=[(1.0, "1\u00d7", "reference speed")],
        empty_message=None,
    )
    return panel, threads


def empty_panel(title, y_label, message):
    return Panel(title, y_label, [], [], 1.0, str, [], message)


# ---------------------------------------------------------------------------------------------
# Numbers and axes.

def round_up(value, step):
    return math.ceil(value / step - 1e-9) * step


def nice_step(span, target_ticks=6):
    """Return a tick step of 1, 2, 2.5 or 5 times a power of ten giving about target_ticks."""
    raw = span / target_ticks
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= factor * power:
            return factor * power
    return 10.0 * power


def nice_ceiling(value):
    return round_up(value, nice_step(value))


def format_tick(value, step):
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if step * 10 ** decimals != round(step * 10 ** decimals):
        decimals += 1  # steps such as 0.25
    return f"{value:.{decimals}f}"


def format_speedup(value):
    if value >= 10:
        return f"{value:.0f}\u00d7"
    if value >= 1:
        return f"{value:.1f}\u00d7"
    return f"{value:.2f}\u00d7"


def fit_font_size(text, width, size):
    """Return size, or a smaller one at which text fits in width.

    A static SVG file cannot measure its text, so the width is an estimate of 0.56 em per
    character of sans-serif text.
    """
    estimated = 0.56 * size * len(text)
    return size if estimated <= width else max(8.0, size * width / estimated)


# ---------------------------------------------------------------------------------------------
# SVG output.

def text_element(x, y, text, size=12, anchor="start", extra=""):
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size:.1f}" text-anchor="{anchor}"{extra}>'
            f"{escape(text)}</text>")


def draw_panel(panel, top):
    """Return the SVG elements of one panel whose top edge is at y = top."""
    elements = [text_element(FIGURE_WIDTH / 2, top + 24, panel.title,
                             fit_font_size(panel.title, FIGURE_WIDTH - 40, 15), "middle",
                             ' font-weight="bold"')]
    plot_top = top + PLOT_TOP
    plot_bottom = top + PLOT_BOTTOM
    plot_width = PLOT_RIGHT - PLOT_LEFT

    def y_of(value):
        return plot_bottom - (plot_bottom - plot_top) * min(value, panel.y_max) / panel.y_max

    # Grid lines and y tick labels.
    step = nice_step(panel.y_max)
    for number in range(math.floor(panel.y_max / step + 1e-9) + 1):
        tick = number * step
        y = y_of(tick)
        elements.append(f'<line x1="{PLOT_LEFT}" y1="{y:.1f}" x2="{PLOT_RIGHT}" y2="{y:.1f}" '
                        'stroke="#e4e4e4"/>')
        elements.append(text_element(PLOT_LEFT - 8, y + 4, format_tick(tick, step), 12, "end"))
    middle = (plot_top + plot_bottom) / 2
    elements.append(text_element(22, middle, panel.y_label, 13, "middle",
                                 f' transform="rotate(-90 22 {middle:.1f})"'))
    elements.append(text_element((PLOT_LEFT + PLOT_RIGHT) / 2, top + PANEL_HEIGHT - 14,
                                 "stream count n (one shape C x T per group)", 13, "middle"))

    # Reference lines go under the bars, and the value labels have a white outline, so that
    # neither hides the other.
    for value, first_line, second_line in panel.reference_lines:
        y = y_of(value)
        elements.append(f'<line x1="{PLOT_LEFT}" y1="{y:.1f}" x2="{PLOT_RIGHT}" y2="{y:.1f}" '
                        'stroke="#333333" stroke-width="1.3" stroke-dasharray="7 4"/>')
        # The label of the higher line sits above it and the other below, so that the two
        # copy-fraction targets, 0.1 apart, do not overlap.
        highest = value == max(line[0] for line in panel.reference_lines)
        first_y = y - 18 if highest else y + 14
        elements.append(text_element(PLOT_RIGHT + 8, first_y, first_line, 12, extra=' fill="#333333"'))
        elements.append(text_element(PLOT_RIGHT + 8, first_y + 14, second_line, 12, extra=' fill="#333333"'))

    if panel.empty_message:
        elements.append(text_element((PLOT_LEFT + PLOT_RIGHT) / 2, middle, panel.empty_message,
                                     14, "middle", ' fill="#777777"'))
    else:
        elements.extend(draw_legend(panel.series, top + 50))
        elements.extend(draw_bars(panel, y_of, plot_bottom, plot_width))

    elements.append(f'<line x1="{PLOT_LEFT}" y1="{plot_bottom:.1f}" x2="{PLOT_RIGHT}" '
                    f'y2="{plot_bottom:.1f}" stroke="#333333"/>')
    elements.append(f'<line x1="{PLOT_LEFT}" y1="{plot_top:.1f}" x2="{PLOT_LEFT}" '
                    f'y2="{plot_bottom:.1f}" stroke="#333333"/>')
    return elements


def draw_legend(series, y):
    """Return a legend row of one swatch and label per series, centred above the plot."""
    widths = [18 + 0.56 * 12 * len(entry.label) + 24 for entry in series]
    x = (PLOT_LEFT + PLOT_RIGHT - sum(widths)) / 2
    elements = []
    for entry, width in zip(series, widths):
        elements.append(f'<rect x="{x:.1f}" y="{y - 10:.1f}" width="12" height="12" fill="{entry.color}"/>')
        elements.append(text_element(x + 18, y, entry.label, 12))
        x += width
    return elements


def draw_bars(panel, y_of, plot_bottom, plot_width):
    """Return the bars, their value labels and the group labels of a panel."""
    elements = []
    group_width = plot_width / len(panel.groups)
    slot_width = min(70.0, 0.8 * group_width / len(panel.series))
    gap = min(4.0, 0.15 * slot_width)
    label_size = min(12.0, max(7.0, slot_width / 3.2))
    for group, (label, shape) in enumerate(panel.groups):
        centre = PLOT_LEFT + (group + 0.5) * group_width
        first_x = centre - slot_width * len(panel.series) / 2
        for slot, entry in enumerate(panel.series):
            value = entry.values[group]
            x = first_x + slot * slot_width + gap / 2
            bar_centre = x + (slot_width - gap) / 2
            if value is None:
                elements.append(text_element(bar_centre, plot_bottom - 4, "n/a", label_size * 0.9,
                                             "middle", ' fill="#999999"'))
                continue
            y = y_of(value)
            elements.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot_width - gap:.1f}" '
                            f'height="{plot_bottom - y:.1f}" fill="{entry.color}">'
                            f"<title>{escape(f'{entry.label}, {label}, {shape}: {panel.value_format(value)}')}"
                            "</title></rect>")
            elements.append(text_element(bar_centre, y - 4, panel.value_format(value), label_size, "middle",
                                         ' stroke="white" stroke-width="3" stroke-linejoin="round"'
                                         ' paint-order="stroke"'))
        elements.append(text_element(centre, plot_bottom + 18, label, 13, "middle"))
        elements.append(text_element(centre, plot_bottom + 34, shape, fit_font_size(shape, group_width - 4, 11),
                                     "middle", ' fill="#555555"'))
    return elements


def describe_run(context, medians, copy_threads, speedup_threads):
    """Return the caption: date, host, CPUs, repetitions and the thread counts of the panels."""
    parts = []
    if context.get("date"):
        parts.append(str(context["date"]))
    host = f"host {context['host_name']}" if context.get("host_name") else "unknown host"
    cpu = []
    if context.get("num_cpus"):
        cpu.append(f"{context['num_cpus']} CPUs")
    if context.get("mhz_per_cpu"):
        cpu.append(f"{context['mhz_per_cpu']} MHz")
    parts.append(host + (f" ({', '.join(cpu)})" if cpu else ""))
    repetitions = sorted({int(median.counters["repetitions"]) for median in medians
                          if "repetitions" in median.counters})
    if repetitions:
        parts.append("medians of " + "/".join(str(count) for count in repetitions) + " repetitions")
    else:
        parts.append("medians")
    if copy_threads is not None:
        parts.append(f"copy_fraction on {count_threads(copy_threads)}")
    if speedup_threads is not None:
        parts.append(f"speed-up on {count_threads(speedup_threads)}")
    return "; ".join(parts)


def render_figure(title, panels, caption):
    height = TITLE_HEIGHT + PANEL_HEIGHT * len(panels) + CAPTION_HEIGHT
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{FIGURE_WIDTH}" height="{height}" '
        f'viewBox="0 0 {FIGURE_WIDTH} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">',
        f"<title>{escape(title)}</title>",
        f"<desc>{escape(caption)}</desc>",
        '<rect width="100%" height="100%" fill="white"/>',
        text_element(FIGURE_WIDTH / 2, 30, title, fit_font_size(title, FIGURE_WIDTH - 40, 18), "middle",
                     ' font-weight="bold"'),
    ]
    for number, panel in enumerate(panels):
        lines.append(f"<g id={quoteattr(f'panel-{number + 1}')}>")
        lines.extend(draw_panel(panel, TITLE_HEIGHT + number * PANEL_HEIGHT))
        lines.append("</g>")
    lines.append(text_element(FIGURE_WIDTH / 2, height - 16, caption,
                              fit_font_size(caption, FIGURE_WIDTH - 30, 12), "middle", ' fill="#444444"'))
    lines.append("</svg>")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------

def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Draw the medians of a layer_bench JSON file (Google Benchmark, "
                    "--benchmark_out_format=json, --benchmark_repetitions=N, "
                    "--benchmark_report_aggregates_only=true) as an SVG figure: copy_fraction of "
                    "the fused kernels and their speed-up over the reference kernels.")
    parser.add_argument("input", help="layer_bench JSON file")
    parser.add_argument("output", help="SVG file to write (overwritten)")
    parser.add_argument("--title", default="mHC layer kernels on the CPU (bench/layer_bench)",
                        help="figure title (default: %(default)s)")
    parser.add_argument("--add", action="append", default=[], metavar="JSON",
                        help="another layer_bench JSON file whose medians fill in the benchmarks "
                             "that INPUT lacks, for example the reference kernels of an earlier "
                             "run; may be repeated. The caption describes INPUT's run.")
    return parser.parse_args(argv)


def main(argv=None):
    arguments = parse_arguments(argv)
    try:
        context, medians = read_medians(arguments.input)
        added = [median for path in arguments.add for median in read_medians(path)[1]]
    except InputError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 1

    # The first median of a benchmark wins, so INPUT's come first and the added files fill gaps.
    index = index_layer_medians(medians + added)
    copy_panel, copy_threads = build_copy_fraction_panel(index)
    speedup_panel, speedup_threads = build_speedup_panel(index)
    caption = describe_run(context, medians, copy_threads, speedup_threads)
    svg = render_figure(arguments.title, [copy_panel, speedup_panel], caption)

    try:
        with open(arguments.output, "w", encoding="utf-8") as file:
            file.write(svg)
    except OSError as error:
        print(f"{PROGRAM}: error: cannot write {arguments.output}: {error.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
