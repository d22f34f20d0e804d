// Graph-editor extension: show each FP8 node's summary (layers quantized, bytes, kernel) on the node itself
// after it runs, instead of only in the server log.
import { app } from "../../scripts/app.js";

const FP8_NODES = new Set(["LoadFP8DiT", "QuantizeTextEncoderFP8", "SaveFP8Model"]);
const WIDGET_NAME = "fp8_summary";

app.registerExtension({
  name: "comfyui.fp8quant.summary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!FP8_NODES.has(nodeData.name)) {
      return;
    }
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      if (!text) {
        return;
      }
      let widget = this.widgets?.find((w) => w.name === WIDGET_NAME);
      if (!widget) {
        widget = this.addWidget("text", WIDGET_NAME, "", () => {}, { multiline: true });
        widget.serialize = false; // a display, not an input: keeps saved workflows' widget values unchanged
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
          widget.inputEl.style.opacity = 0.75;
        }
      }
      widget.value = text;
      this.setSize?.([this.size[0], this.computeSize()[1]]);
      app.graph.setDirtyCanvas(true, false);
    };
  },
});
