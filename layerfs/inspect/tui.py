"""The image explorer's terminal UI (textual), laid out and keyed like dive.

Left: the layers (index, size, the command that made each), the selected layer's
details and the image's efficiency, and the wasted space (paths stored more than once,
with their count and bytes). Right: the file tree as of the selected layer, each entry
coloured by what happened to it: green added, yellow modified, red removed (shown where
it was), plain unmodified; in *layer* mode the changes of the selected layer alone, in
*aggregated* mode those of every layer above the base up to it.

Keys (``?`` shows them): dive's, with ``m`` next to ``Ctrl+M`` because terminals send
Ctrl+M as Enter.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from typing import Any, ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Static, Tree
from textual.widgets.tree import TreeNode

from .explore import Analysis
from .index import DIR, Entry
from .stack import ADDED, MODIFIED, REMOVED, UNMODIFIED, Stack

#: The wasted-space table shows the largest this many (drawing a table costs per row).
WASTED_ROWS = 100

COLOURS = {ADDED: "green", MODIFIED: "yellow", REMOVED: "red", UNMODIFIED: ""}

#: (key, pane, what it does) — the help screen and the docs list these.
KEYS: list[tuple[str, str, str]] = [
    ("Ctrl+C, q", "", "quit"),
    ("Tab", "", "switch between the layers and the file tree"),
    ("Ctrl+F", "", "filter files by path (Enter applies, Esc clears)"),
    ("?", "", "show these keys"),
    ("PageUp/PageDown", "", "scroll up/down a page"),
    ("Ctrl+A", "layers", "aggregated: changes of every layer above the base, up to this one"),
    ("Ctrl+L", "layers", "this layer's changes only"),
    ("Space", "files", "collapse/expand a directory"),
    ("Ctrl+Space", "files", "collapse/expand all directories"),
    ("Ctrl+A", "files", "show/hide added files"),
    ("Ctrl+R", "files", "show/hide removed files"),
    ("Ctrl+M, m", "files", "show/hide modified files"),
    ("Ctrl+U", "files", "show/hide unmodified files (\"changes only\")"),
    ("Ctrl+B", "files", "show/hide file attributes"),
]


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "dismiss", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > DataTable { width: auto; max-width: 100%; height: auto;
                             border: round $accent; }
    """

    def compose(self) -> ComposeResult:
        table: DataTable[str] = DataTable(id="keys", cursor_type="none")
        table.add_columns("key", "pane", "action")
        for key, pane, action in KEYS:
            table.add_row(key, pane, action)
        yield table


class LayerTable(DataTable[str]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+a", "app.compare('aggregated')", "aggregated"),
        Binding("ctrl+l", "app.compare('layer')", "layer changes"),
    ]


class FileTree(Tree[str]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+space,ctrl+@", "app.toggle_all", "collapse/expand all"),
        Binding("ctrl+a", "app.show('added')", "added"),
        Binding("ctrl+r", "app.show('removed')", "removed"),
        Binding("ctrl+m,m", "app.show('modified')", "modified"),
        Binding("ctrl+u", "app.show('unmodified')", "unmodified"),
        Binding("ctrl+b", "app.attributes", "attributes"),
    ]


class ExploreApp(App[None]):
    """``layerfs image explore``: construct with an :class:`Analysis`, then ``run()``."""

    TITLE = "layerfs image explore"
    CSS = """
    #left { width: 50%; }
    #right { width: 50%; }
    #layers { height: 45%; border: round $primary; }
    #details { height: auto; max-height: 12; border: round $primary; padding: 0 1; }
    #wasted { height: 1fr; border: round $primary; }
    #files { height: 1fr; border: round $primary; }
    #filter { display: none; }
    #filter.shown { display: block; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+c,q", "quit", "quit", priority=True),
        Binding("tab", "switch_pane", "switch pane", priority=True),
        Binding("ctrl+f", "filter", "filter"),
        Binding("question_mark", "help", "keys"),
    ]

    def __init__(self, analysis: Analysis, size: Callable[[int], str]) -> None:
        super().__init__()
        self.analysis = analysis
        self.stack: Stack = analysis.stack
        self.fmt_size = size
        self.shown_layer = self.stack.top
        self.compare_all = False
        self.show_marks = {ADDED: True, REMOVED: True, MODIFIED: True, UNMODIFIED: True}
        self.show_attributes = True
        self.filter_text = ""
        self._filtered: set[str] | None = None
        self._expanded: set[str] = set()
        self._view_ready = False
        self._changed_dirs: set[str] = set()

    # --- layout -------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="left"):
                yield LayerTable(id="layers", cursor_type="row", zebra_stripes=False)
                yield Static(id="details")
                yield DataTable(id="wasted", cursor_type="row")
            with Vertical(id="right"):
                yield Input(placeholder="filter: part of a path, Enter to apply, Esc to clear",
                            id="filter")
                yield FileTree("/", id="files")
        yield Footer()

    def on_mount(self) -> None:
        layers = self.query_one("#layers", LayerTable)
        layers.border_title = "Layers"
        layers.add_columns("#", "Size", "Command")
        for sl in self.stack.layers:
            layers.add_row(str(sl.position + 1), self.fmt_size(sl.size),
                           sl.command or "(no history)", key=str(sl.position))
        wasted = self.query_one("#wasted", DataTable)
        wasted.border_title = "Wasted space"
        wasted.add_columns("Count", "Total Space", "Path")
        found = self.analysis.efficiency.inefficiencies
        for item in found[:WASTED_ROWS]:
            wasted.add_row(str(item.count), self.fmt_size(item.wasted), "/" + item.path)
        if len(found) > WASTED_ROWS:
            wasted.add_row("", "", f"... {len(found) - WASTED_ROWS} more, smaller (--json "
                                   f"lists them all)")
        self.query_one("#files", FileTree).show_root = False
        layers.move_cursor(row=self.shown_layer)
        layers.focus()
        # The table highlights its first row, then ours: draw once, after both.
        self.call_after_refresh(self._first_view)

    def _first_view(self) -> None:
        self._view_ready = True
        self.refresh_view()

    # --- what is shown ------------------------------------------------------------------
    def effective_mark(self, path: str, entry_kind: str | None) -> str:
        mark = self.stack.mark(path, self.shown_layer, aggregated=self.compare_all)
        if mark == UNMODIFIED and entry_kind == DIR and path in self._changed_dirs:
            return MODIFIED
        return mark

    def _shown(self, path: str, mark: str) -> bool:
        if self._filtered is not None and path not in self._filtered:
            return False
        return self.show_marks[mark]

    def dir_size(self, path: str, layer: int) -> int:
        return self.stack.dir_sizes(layer).get(path, 0) if layer >= 0 else 0

    def label(self, path: str, name: str, entry: Entry, mark: str) -> Text:
        text = Text()
        if self.show_attributes:
            size = self.dir_size(path, self.shown_layer if mark != REMOVED else self.shown_layer - 1) \
                if entry.kind == DIR else entry.size
            text.append(f"{stat.filemode(entry.st_mode)} {entry.uid:>5}:{entry.gid:<5} "
                        f"{self.fmt_size(size):>9}  ", style=COLOURS[mark] or "dim")
        shown = name + (f" → {entry.link}" if entry.link else "")
        text.append(shown, style=COLOURS[mark])
        return text

    def fill(self, node: TreeNode[str], path: str) -> None:
        """Add the entries of directory ``path`` under ``node``."""
        since = 1 if self.compare_all else self.shown_layer
        for name in self.stack.children(path, self.shown_layer, with_removed=True, since=since):
            child = f"{path}/{name}" if path else name
            now = self.stack.entry_at(child, self.shown_layer)
            entry = now if now is not None else self.stack.entry_at(child, since - 1)
            if entry is None:
                continue
            mark = REMOVED if now is None else self.effective_mark(child, entry.kind)
            if not self._shown(child, mark):
                continue
            label = self.label(child, name, entry, mark)
            if entry.kind == DIR and (self.stack.names.get(child)):
                sub = node.add(label, data=child, allow_expand=True)
                if child in self._expanded:
                    self.fill(sub, child)
                    sub.expand()
            else:
                node.add_leaf(label, data=child)

    def refresh_view(self) -> None:
        tree = self.query_one("#files", FileTree)
        self._changed_dirs = self.stack.dirs_with_changes(self.shown_layer, aggregated=self.compare_all)
        tree.clear()
        self.fill(tree.root, "")
        tree.root.expand()
        sl = self.stack.layers[self.shown_layer]
        mode = "aggregated changes of layers 2 to" if self.compare_all and self.shown_layer else \
            "changes of layer"
        hidden = [k for k, v in self.show_marks.items() if not v]
        tree.border_title = f"Files as of layer {self.shown_layer + 1} ({mode} {self.shown_layer + 1})"
        tree.border_subtitle = (f"hidden: {', '.join(hidden)}" if hidden else "") + \
            (f"  filter: {self.filter_text}" if self.filter_text else "")
        eff = self.analysis.efficiency
        ratio = eff.user_wasted_ratio
        pct = "inf" if ratio == float("inf") else f"{ratio * 100:.1f} %"
        details = self.query_one("#details", Static)
        details.border_title = f"Layer {self.shown_layer + 1} of {len(self.stack.layers)}"
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("Command", sl.command or "(no history)")
        grid.add_row("Digest" if sl.diff_id else "Layer",
                     f"{sl.diff_id or sl.layer_id[:12]}")
        grid.add_row("Size", f"{self.fmt_size(sl.size)}, {len(sl.entries)} entries")
        grid.add_row("Image", f"{self.fmt_size(eff.size_bytes)}, efficiency "
                              f"{eff.score * 100:.1f} %, wasted {self.fmt_size(eff.wasted_bytes)}"
                              f" ({pct} of the layers above the base)")
        details.update(grid)

    # --- events -------------------------------------------------------------------------
    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if not self._view_ready or event.data_table.id != "layers" or event.row_key.value is None:
            return
        layer = int(event.row_key.value)
        if layer != self.shown_layer:
            self.shown_layer = layer
            self.refresh_view()

    def on_tree_node_expanded(self, event: Tree.NodeExpanded[str]) -> None:
        node = event.node
        path = node.data
        if path is None:
            return
        self._expanded.add(path)
        if not node.children:
            self.fill(node, path)

    def on_tree_node_collapsed(self, event: Tree.NodeCollapsed[str]) -> None:
        if event.node.data is not None:
            self._expanded.discard(event.node.data)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.apply_filter(event.value)
        self.query_one("#files", FileTree).focus()

    def on_key(self, event: Any) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_class("shown"):
            box.value = ""
            box.remove_class("shown")
            self.apply_filter("")
            self.query_one("#files", FileTree).focus()
            event.stop()

    # --- actions ------------------------------------------------------------------------
    def apply_filter(self, text: str) -> None:
        self.filter_text = text.strip()
        if not self.filter_text:
            self._filtered = None
        else:
            keep: set[str] = set()
            for path in self.stack.paths():
                if self.filter_text in "/" + path:
                    keep.add(path)
                    parts = path.split("/")
                    keep.update("/".join(parts[:i]) for i in range(1, len(parts)))
            self._filtered = keep
            self._expanded |= {p for p in keep if self.stack.names.get(p)}
        self.refresh_view()

    def action_compare(self, mode: str) -> None:
        self.compare_all = mode == "aggregated"
        self.refresh_view()

    def action_show(self, mark: str) -> None:
        self.show_marks[mark] = not self.show_marks[mark]
        self.refresh_view()

    def action_attributes(self) -> None:
        self.show_attributes = not self.show_attributes
        self.refresh_view()

    def action_toggle_all(self) -> None:
        if self._expanded:
            self._expanded.clear()
        else:
            self._expanded = {p for p, names in self.stack.names.items() if p and names}
        self.refresh_view()

    def action_switch_pane(self) -> None:
        layers = self.query_one("#layers", LayerTable)
        files = self.query_one("#files", FileTree)
        (files if layers.has_focus else layers).focus()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.focus()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())
