// The run's DAG as SVG: steps in columns by longest path from a root, left to right, arrows from each dependency.
import { statusClass } from "./common.js";

const SVG = "http://www.w3.org/2000/svg";
const BOX = { width: 176, height: 50, colGap: 64, rowGap: 18, pad: 16 };
const MAX_NAME = 19;

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Layer of each step: 0 for a root, else one more than its deepest dependency (unknown names are ignored).
export function layersOf(steps) {
  const layer = new Map();
  const visiting = new Set();
  const visit = (name) => {
    if (layer.has(name)) return layer.get(name);
    if (visiting.has(name)) return 0; // a cycle cannot pass validation; never loop on one anyway
    visiting.add(name);
    const deps = (steps[name].depends_on || []).filter((d) => d in steps);
    const value = deps.length ? 1 + Math.max(...deps.map(visit)) : 0;
    visiting.delete(name);
    layer.set(name, value);
    return value;
  };
  Object.keys(steps).forEach(visit);
  return layer;
}

// Positions: columns by layer; within a column, declaration order, then sorted by the mean row of the dependencies
// (one barycentre pass, enough to untangle most real workflows); columns centred on the tallest.
export function layout(steps) {
  const layer = layersOf(steps);
  const columns = [];
  for (const name of Object.keys(steps)) (columns[layer.get(name)] ||= []).push(name);
  const row = new Map();
  columns.forEach((column, index) => {
    if (index > 0) {
      const mean = (name) => {
        const rows = (steps[name].depends_on || []).filter((d) => row.has(d)).map((d) => row.get(d));
        return rows.length ? rows.reduce((a, b) => a + b, 0) / rows.length : 0;
      };
      const order = new Map(column.map((name, i) => [name, i]));
      column.sort((a, b) => mean(a) - mean(b) || order.get(a) - order.get(b));
    }
    column.forEach((name, i) => row.set(name, i));
  });
  const tallest = Math.max(1, ...columns.map((c) => c.length));
  const nodes = new Map();
  columns.forEach((column, index) => {
    const shift = ((tallest - column.length) * (BOX.height + BOX.rowGap)) / 2;
    column.forEach((name, i) => {
      nodes.set(name, {
        x: BOX.pad + index * (BOX.width + BOX.colGap),
        y: BOX.pad + shift + i * (BOX.height + BOX.rowGap),
      });
    });
  });
  return {
    nodes,
    width: 2 * BOX.pad + columns.length * BOX.width + Math.max(0, columns.length - 1) * BOX.colGap,
    height: 2 * BOX.pad + tallest * BOX.height + (tallest - 1) * BOX.rowGap,
  };
}

function shortName(name) {
  return name.length > MAX_NAME ? `${name.slice(0, MAX_NAME - 1)}…` : name;
}

// Draws the DAG into the <svg> element; returns update(name, status, attempts) and select(name) for the page.
export function drawDag(root, steps, onSelect) {
  const { nodes, width, height } = layout(steps);
  root.replaceChildren();
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  root.setAttribute("width", width);
  root.setAttribute("height", height);
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7,
    markerHeight: 7, orient: "auto-start-reverse" });
  marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrow-head" }));
  const defs = svg("defs");
  defs.append(marker);
  root.append(defs);

  const edges = svg("g", { class: "edges" });
  for (const [name, step] of Object.entries(steps)) {
    for (const dep of (step.depends_on || []).filter((d) => nodes.has(d))) {
      const from = nodes.get(dep);
      const to = nodes.get(name);
      const [x1, y1] = [from.x + BOX.width, from.y + BOX.height / 2];
      const [x2, y2] = [to.x - 2, to.y + BOX.height / 2];
      const bend = Math.max(24, (x2 - x1) / 2);
      edges.append(svg("path", { class: "edge", "data-from": dep, "data-to": name, "marker-end": "url(#arrow)",
        d: `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2} ${y2}` }));
    }
  }
  root.append(edges);

  const boxes = new Map();
  for (const [name, { x, y }] of nodes) {
    const box = svg("g", { class: "step", transform: `translate(${x} ${y})`, tabindex: 0, role: "button",
      "data-step": name, "aria-label": `step ${name}` });
    const meta = svg("text", { x: 12, y: 38, class: "step-meta" });
    box.append(svg("title", {}, name), svg("rect", { width: BOX.width, height: BOX.height, rx: 8 }),
      svg("text", { x: 12, y: 21, class: "step-name" }, shortName(name)), meta);
    box.addEventListener("click", () => onSelect(name));
    box.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        onSelect(name);
      }
    });
    boxes.set(name, { box, meta });
    root.append(box);
  }

  return {
    update(name, status, attempts) {
      const entry = boxes.get(name);
      if (!entry) return;
      entry.box.setAttribute("data-status", status);
      const selected = entry.box.classList.contains("selected") ? " selected" : "";
      entry.box.setAttribute("class", `step ${statusClass(status)}${selected}`);
      const kind = steps[name].kind ? `${steps[name].kind} · ` : "";
      entry.meta.textContent = `${kind}${status.replace("_", " ")}${attempts > 1 ? ` · attempt ${attempts}` : ""}`;
    },
    select(name) {
      for (const [other, { box }] of boxes) box.classList.toggle("selected", other === name);
    },
  };
}
