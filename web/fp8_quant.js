// Graph-editor extension: every node of this pack shows its summary (layers quantized, bytes before -> after,
// kernel and why) on the node itself after it runs, not only in the server log.
//
// The summary sits in a read-only box of fixed height that is part of the node from the moment it is created,
// so a run never makes the node grow over its neighbours; longer text wraps, and scrolls only past that height.
// It is a display, not an input: it stays out of the prompt (`options.serialize`: a summary sent back as an
// input would change the node's cache key, and ComfyUI would reload and requantize the model on the next
// unchanged run) and out of saved workflows (`serialize`).
import { app } from "../../scripts/app.js";

const WIDGET_NAME = "fp8_summary";
const PLACEHOLDER = "FP8 summary: shown here after the node runs";
const BOX_LINES = 10;
const LINE_HEIGHT_PX = 15;
const BOX_PADDING_PX = 8;
const BOX_HEIGHT_PX = BOX_LINES * LINE_HEIGHT_PX + 2 * BOX_PADDING_PX;

// ComfyUI serves this file as /extensions/<pack folder>/fp8_quant.js and tags each node definition with the
// module that registered it ("custom_nodes.<pack folder>"): together they pick out every node of this pack,
// whatever the folder is called, with no list of node names to keep in step with the Python side.
const PACK_MODULE = `custom_nodes.${decodeURIComponent(new URL(import.meta.url).pathname.split("/").at(-2))}`;
// Servers that predate `python_module` still send the category all of this pack's nodes share.
const PACK_CATEGORY = "loaders/fp8";

function isPackNode(nodeData) {
  if (nodeData.python_module) {
    return nodeData.python_module === PACK_MODULE;
  }
  return nodeData.category === PACK_CATEGORY;
}

function summaryBox() {
  const box = document.createElement("div");
  box.className = "fp8-quant-summary";
  box.title = "FP8 summary of the last run (read-only; select to copy)";
  Object.assign(box.style, {
    boxSizing: "border-box",
    height: `${BOX_HEIGHT_PX}px`,
    padding: `${BOX_PADDING_PX}px`,
    overflowY: "auto",
    whiteSpace: "pre-wrap",
    overflowWrap: "anywhere",
    userSelect: "text",
    cursor: "text",
    font: `11px/${LINE_HEIGHT_PX}px monospace`,
    color: "var(--input-text, #ddd)",
    background: "var(--comfy-input-bg, #222)",
    borderRadius: "6px",
    opacity: "0.6",
  });
  box.textContent = PLACEHOLDER;
  return box;
}

function addSummaryWidget(node) {
  const box = summaryBox();
  let summary = "";
  const widget = node.addDOMWidget(WIDGET_NAME, "fp8_summary", box, {
    serialize: false, // not part of the prompt
    hideInPanel: true,
    getMinHeight: () => BOX_HEIGHT_PX,
    getMaxHeight: () => BOX_HEIGHT_PX,
    getValue: () => summary,
    setValue: (text) => {
      summary = typeof text === "string" ? text : "";
      box.textContent = summary || PLACEHOLDER;
      box.style.opacity = summary ? "1" : "0.6";
    },
  });
  widget.serialize = false; // not part of saved workflows
  return widget;
}

app.registerExtension({
  name: "comfyui.fp8quant.summary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isPackNode(nodeData)) {
      return;
    }
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      addSummaryWidget(this);
      // The frontend sized the new node before this widget existed; make room for it now, while nothing is
      // placed around the node yet (a loaded workflow then applies its saved size).
      const [width, height] = this.size;
      this.setSize([width, Math.max(height, this.computeSize()[1])]);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === WIDGET_NAME);
      const text = (message?.text ?? []).join("\n");
      if (widget && text) {
        widget.value = text;
      }
    };
  },
});
