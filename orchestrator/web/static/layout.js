// Where the DAG's boxes and edges go: a layered (Sugiyama-style) layout, pure so it can be checked on its own.
//
// Steps sit in layers by longest path from a root, left to right. A layer taller than BOX.maxRows wraps into several
// side-by-side columns, so a wide fan-out stays a few rows high. An edge that skips columns passes through each
// column in between at a "lane": a slot of its own in that column's stack, so it never runs behind a box. Lanes are
// shared by the edges of one fan-out (or fan-in), which keeps wrapped layers to one or two extra lanes per column.
// Between two columns an edge is a curve in the empty channel; across a column, a straight line along its lane.

export const BOX = { width: 188, height: 62, colGap: 64, wrapGap: 40, rowGap: 16, pad: 16, maxRows: 6 };
const SWEEPS = 2;

// Layer of each step: 0 for a root, else one more than its deepest dependency (unknown names are ignored).
export function layersOf(steps) {
  const layer = new Map();
  const visiting = new Set();
  const visit = (name) => {
    if (layer.has(name)) return layer.get(name);
    if (visiting.has(name)) return 0; // a cycle cannot pass validation; never loop on one anyway
    visiting.add(name);
    const deps = depsOf(steps, name);
    const value = deps.length ? 1 + Math.max(...deps.map(visit)) : 0;
    visiting.delete(name);
    layer.set(name, value);
    return value;
  };
  Object.keys(steps).forEach(visit);
  return layer;
}

function depsOf(steps, name) {
  return (steps[name].depends_on || []).filter((d) => d in steps && d !== name);
}

const mean = (values) => values.reduce((a, b) => a + b, 0) / values.length;

// Sorts `items` by the mean of `key` over each item's neighbours (stable; items without neighbours keep their place
// relative to each other).
function sortByBarycentre(items, neighbours, position) {
  const order = new Map(items.map((item, i) => [item, i]));
  const weight = new Map();
  for (const item of items) {
    const known = neighbours(item).filter((n) => position.has(n));
    weight.set(item, known.length ? mean(known.map((n) => position.get(n))) : null);
  }
  // Items without neighbours take the weight of the item before them, so they stay where they were.
  let last = -Infinity;
  for (const item of items) {
    if (weight.get(item) === null) weight.set(item, last);
    last = weight.get(item);
  }
  items.sort((a, b) => weight.get(a) - weight.get(b) || order.get(a) - order.get(b));
}

// Layers in declaration order, then one barycentre pass on the dependencies: decides which wrapped column each
// step of a wide layer lands in.
function orderedLayers(steps, layer) {
  const layers = [];
  for (const name of Object.keys(steps)) (layers[layer.get(name)] ||= []).push(name);
  const position = new Map();
  for (const names of layers) {
    sortByBarycentre(names, (name) => depsOf(steps, name), position);
    names.forEach((name, i) => position.set(name, i - (names.length - 1) / 2));
  }
  return layers;
}

// Columns of items ({id, node}); wide layers wrap into ceil(n / maxRows) balanced columns.
function wrapColumns(layers) {
  const columns = [];
  for (const names of layers) {
    const parts = Math.ceil(names.length / BOX.maxRows);
    const size = Math.ceil(names.length / parts);
    for (let i = 0; i < parts; i++) {
      columns.push({ items: names.slice(i * size, (i + 1) * size), lastOfLayer: i === parts - 1 });
    }
  }
  return columns;
}

// Every edge as its route of item ids (the dependency, the lanes it passes, the step), and the set of lane ids;
// adds the lanes to the columns.
function routeEdges(steps, columns) {
  const column = new Map();
  columns.forEach((c, index) => c.items.forEach((id) => column.set(id, index)));
  const outDegree = new Map(Object.keys(steps).map((name) => [name, 0]));
  for (const name of Object.keys(steps)) {
    for (const dep of depsOf(steps, name)) outDegree.set(dep, outDegree.get(dep) + 1);
  }
  const lanes = new Set();
  const routes = [];
  for (const name of Object.keys(steps)) {
    const deps = depsOf(steps, name);
    for (const dep of deps) {
      // A fan-out shares the lanes of its source, a fan-in those of its target.
      const key = outDegree.get(dep) >= deps.length ? `>${dep}` : `<${name}`;
      const route = [dep];
      for (let c = column.get(dep) + 1; c < column.get(name); c++) {
        const lane = `${key}@${c}`;
        if (!lanes.has(lane)) {
          lanes.add(lane);
          columns[c].items.push(lane);
        }
        route.push(lane);
      }
      route.push(name);
      routes.push({ from: dep, to: name, route });
    }
  }
  return { routes, lanes };
}

// The vertical extent of a column's stack: boxes are BOX.height tall, lanes take no height; rowGap between items.
function stackOf(items, isNode) {
  const centre = new Map();
  let y = 0;
  items.forEach((id, i) => {
    if (i) y += BOX.rowGap;
    const size = isNode(id) ? BOX.height : 0;
    centre.set(id, y + size / 2);
    y += size;
  });
  return { centre, height: y };
}

// Positions: {nodes: Map name → {x, y} (top left), lanes: Map id → {x, y}, edges: [{from, to, route}],
// width, height}.
export function layout(steps) {
  const layers = orderedLayers(steps, layersOf(steps));
  const columns = wrapColumns(layers);
  const { routes: edges, lanes: laneIds } = routeEdges(steps, columns);
  const isNode = (id) => !laneIds.has(id);
  const before = new Map(); // item → items it is joined to in the column on its left; `after`: on its right
  const after = new Map();
  for (const { route } of edges) {
    for (let i = 1; i < route.length; i++) {
      (before.get(route[i]) || before.set(route[i], []).get(route[i])).push(route[i - 1]);
      (after.get(route[i - 1]) || after.set(route[i - 1], []).get(route[i - 1])).push(route[i]);
    }
  }
  // Barycentre sweeps over the columns (lanes included), right then left, positions centred on each column.
  const position = new Map();
  const place = (column) => {
    const { centre, height } = stackOf(column.items, isNode);
    for (const [id, y] of centre) position.set(id, y - height / 2);
  };
  columns.forEach(place);
  for (let sweep = 0; sweep < SWEEPS; sweep++) {
    for (const column of columns) {
      sortByBarycentre(column.items, (id) => before.get(id) || [], position);
      place(column);
    }
    for (const column of [...columns].reverse()) {
      sortByBarycentre(column.items, (id) => after.get(id) || [], position);
      place(column);
    }
  }
  const stacks = columns.map((column) => stackOf(column.items, isNode));
  const tallest = Math.max(BOX.height, ...stacks.map((s) => s.height));
  const nodes = new Map();
  const lanes = new Map();
  let x = BOX.pad;
  columns.forEach((column, index) => {
    const { centre, height } = stacks[index];
    const top = BOX.pad + (tallest - height) / 2;
    for (const [id, y] of centre) {
      if (isNode(id)) nodes.set(id, { x, y: top + y - BOX.height / 2 });
      else lanes.set(id, { x, y: top + y });
    }
    x += BOX.width + (index === columns.length - 1 ? 0 : column.lastOfLayer ? BOX.colGap : BOX.wrapGap);
  });
  return { nodes, lanes, edges, width: x + BOX.pad, height: 2 * BOX.pad + tallest };
}

// The SVG path of an edge: a curve across each channel, a straight line along each lane it passes.
export function edgePath({ route }, { nodes, lanes }) {
  const first = nodes.get(route[0]);
  const points = [[first.x + BOX.width, first.y + BOX.height / 2]];
  for (const id of route.slice(1, -1)) {
    const lane = lanes.get(id);
    points.push([lane.x, lane.y], [lane.x + BOX.width, lane.y]);
  }
  const last = nodes.get(route[route.length - 1]);
  points.push([last.x - 2, last.y + BOX.height / 2]);
  let d = `M ${points[0][0]} ${points[0][1]}`;
  for (let i = 1; i < points.length; i++) {
    const [[x1, y1], [x2, y2]] = [points[i - 1], points[i]];
    if (i % 2 === 0) {
      d += ` L ${x2} ${y2}`; // along a lane
    } else {
      const bend = (x2 - x1) / 2;
      d += ` C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2} ${y2}`;
    }
  }
  return d;
}
