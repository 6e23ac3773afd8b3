// The run's DAG as SVG: boxes where layout.js puts them, an arrow from each dependency, routed around the boxes.
import { statusClass } from "./common.js";
import { BOX, edgePath, layout } from "./layout.js";

const SVG = "http://www.w3.org/2000/svg";
const MAX_NAME = 20;

// An SVG element with attributes and, optionally, text (shared with the timeline).
export function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function shortName(name) {
  return name.length > MAX_NAME ? `${name.slice(0, MAX_NAME - 1)}…` : name;
}

// Draws the DAG into the <svg> element; returns update(name, status, attempts, facts) (facts: the third line, e.g.
// duration and cost), select(name) and mark(names) (the critical path) for the page.
export function drawDag(root, steps, onSelect) {
  const placed = layout(steps);
  const { nodes, width, height } = placed;
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
  for (const edge of placed.edges) {
    edges.append(svg("path", { class: "edge", "data-from": edge.from, "data-to": edge.to, "marker-end": "url(#arrow)",
      d: edgePath(edge, placed) }));
  }
  root.append(edges);

  const boxes = new Map();
  for (const [name, { x, y }] of nodes) {
    const box = svg("g", { class: "step", transform: `translate(${x} ${y})`, tabindex: 0, role: "button",
      "data-step": name, "aria-label": `step ${name}` });
    const meta = svg("text", { x: 12, y: 37, class: "step-meta" });
    const facts = svg("text", { x: 12, y: 53, class: "step-facts" });
    box.append(svg("title", {}, name), svg("rect", { width: BOX.width, height: BOX.height, rx: 8 }),
      svg("text", { x: 12, y: 20, class: "step-name" }, shortName(name)), meta, facts);
    box.addEventListener("click", () => onSelect(name));
    box.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        onSelect(name);
      }
    });
    boxes.set(name, { box, meta, facts });
    root.append(box);
  }

  return {
    update(name, status, attempts, facts = "") {
      const entry = boxes.get(name);
      if (!entry) return;
      entry.box.setAttribute("data-status", status);
      const kept = ["selected", "critical"].filter((flag) => entry.box.classList.contains(flag));
      entry.box.setAttribute("class", ["step", statusClass(status), ...kept].join(" "));
      const kind = steps[name].kind ? `${steps[name].kind} · ` : "";
      entry.meta.textContent = `${kind}${status.replace("_", " ")}${attempts > 1 ? ` · attempt ${attempts}` : ""}`;
      if (entry.facts.textContent !== facts) entry.facts.textContent = facts;
    },
    select(name) {
      for (const [other, { box }] of boxes) box.classList.toggle("selected", other === name);
    },
    mark(names) {
      for (const [other, { box }] of boxes) box.classList.toggle("critical", names.has(other));
      for (const path of edges.children) {
        const on = names.has(path.dataset.from) && names.has(path.dataset.to);
        path.classList.toggle("critical", on);
      }
    },
  };
}
