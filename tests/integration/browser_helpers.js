// Page-side helpers for test_browser.py: they read the graph editor's own state (window.app, LiteGraph) and
// hand plain data back to the test, which makes the assertions. Injected with a script tag as `window.fp8`.
(() => {
  const SUMMARY_WIDGET = "fp8_summary";
  const INSET = 4; // graph units inside a node's edge, where only the node itself may be drawn

  const frames = (count) =>
    new Promise((resolve) => {
      const step = (left) => (left ? requestAnimationFrame(() => step(left - 1)) : resolve());
      step(count);
    });

  // The frontend blocks the page with a fading mask while it loads a workflow (PrimeVue's BlockUI); what lies
  // under it is only seen once it has gone. Waits for it, up to a bound, so a slow CI machine reads the graph as
  // the user does a moment later, and a mask that never leaves still shows in the hit test.
  const maskGone = async (timeoutMs = 15000) => {
    const until = performance.now() + timeoutMs;
    while (document.querySelector(".p-blockui-mask, .p-overlay-mask") && performance.now() < until) {
      await frames(5);
    }
  };

  const toScreen = ([x, y]) => {
    const { offset, scale } = app.canvas.ds;
    const box = app.canvas.canvas.getBoundingClientRect();
    return [box.left + (x + offset[0]) * scale, box.top + (y + offset[1]) * scale];
  };

  // What the user sees at a graph point: "canvas" where the graph editor draws, else the element on top.
  const seenAt = (point) => {
    const [x, y] = toScreen(point);
    const element = document.elementFromPoint(x, y);
    if (element === app.canvas.canvas) {
      return "canvas";
    }
    return element ? `${element.tagName}.${element.className}`.slice(0, 120) : `off screen at ${x},${y}`;
  };

  const titleHeight = () => LiteGraph.NODE_TITLE_HEIGHT;

  const nodeRect = (node) => [node.pos[0], node.pos[1] - titleHeight(), node.size[0], node.size[1] + titleHeight()];

  const cornerHits = (node) => {
    const [x, y, w, h] = nodeRect(node);
    const points = [
      [x + INSET, y + INSET],
      [x + w - INSET, y + INSET],
      [x + INSET, y + h - INSET],
      [x + w - INSET, y + h - INSET],
    ];
    return points.map(seenAt);
  };

  const describeNode = (node) => ({
    id: String(node.id),
    type: node.type,
    registered: Boolean(LiteGraph.registered_node_types[node.type]) && !node.has_errors,
    widgets: (node.widgets ?? []).map((w) => w.name),
    values: (node.widgets ?? []).map((w) => w.value),
    rect: nodeRect(node),
    size: [...node.size],
    min_size: [...node.computeSize()],
    hits: cornerHits(node),
  });

  const screenClip = (rects) => {
    const corners = rects.flatMap(([x, y, w, h]) => [toScreen([x, y]), toScreen([x + w, y + h])]);
    const left = Math.max(0, Math.min(...corners.map((p) => p[0])) - 8);
    const top = Math.max(0, Math.min(...corners.map((p) => p[1])) - 8);
    const right = Math.min(window.innerWidth, Math.max(...corners.map((p) => p[0])) + 8);
    const bottom = Math.min(window.innerHeight, Math.max(...corners.map((p) => p[1])) + 8);
    return { x: left, y: top, width: right - left, height: bottom - top };
  };

  const rectsById = () => Object.fromEntries(app.graph.nodes.map((node) => [String(node.id), nodeRect(node)]));

  const summaryWidget = (id) => app.graph.getNodeById(Number(id))?.widgets?.find((w) => w.name === SUMMARY_WIDGET);

  window.fp8 = {
    async openTemplate(url) {
      const workflow = await (await fetch(url)).json();
      await app.loadGraphData(workflow);
      await frames(3);
      await maskGone();
      const groups = app.graph.groups.map((group) => ({ title: group.title, rect: [...group.pos, ...group.size] }));
      return {
        nodes: app.graph.nodes.map(describeNode),
        groups,
        clip: screenClip(groups.map((group) => group.rect)),
      };
    },

    async loadApiPrompt(prompt) {
      app.loadApiJson(prompt, "fp8-browser-test");
      for (const node of app.graph.nodes) {
        for (const widget of node.widgets ?? []) {
          if (widget.name === "control_after_generate") {
            widget.value = "fixed"; // the next run must be the same graph
          }
        }
      }
      await frames(3);
      await maskGone();
      return { rects: rectsById() };
    },

    summariesShown(expected) {
      return Object.entries(expected).every(([id, text]) => summaryWidget(id)?.element?.textContent === text);
    },

    async summaryState(ids) {
      const summaries = {};
      for (const id of ids) {
        const widget = summaryWidget(id);
        const element = widget?.element;
        if (!element) {
          // Not a box of its own (a canvas-drawn text widget, or none): nothing that can be shown read-only.
          summaries[id] = { text: widget?.value ?? null, tag: widget ? `${widget.type} widget` : "none", editable: true };
          continue;
        }
        const box = element.getBoundingClientRect();
        summaries[id] = {
          text: element.textContent,
          tag: element.tagName,
          editable: element.isContentEditable,
          scroll_height: element.scrollHeight,
          client_height: element.clientHeight,
          center: [box.left + box.width / 2, box.top + box.height / 2],
        };
      }
      const prompt = await app.graphToPrompt();
      const workflows = {
        "graph.serialize()": app.graph.serialize(),
        "graphToPrompt().workflow": prompt.workflow,
        "graphToPrompt().output (the prompt)": prompt.output,
      };
      const active = app.extensionManager?.workflow?.activeWorkflow;
      if (active?.changeTracker?.activeState) {
        workflows["the open workflow's saved state"] = active.changeTracker.activeState;
      }
      return { summaries, workflows, rects: rectsById() };
    },

    summaryText(id) {
      return summaryWidget(id)?.element?.textContent ?? null;
    },

    promptDialogOpen() {
      return Boolean(document.querySelector(".graphdialog, .litegraph .dialog"));
    },
  };
})();
