// Runs the script of a `toolkit view` page under node with a minimal DOM (no browser needed) and
// prints, as JSON, what it drew: each heatmap's cell fills by map name, and each colour-scale
// legend's label and texts. Usage: node tests/view_dom.js PAGE.html
"use strict";
const fs = require("fs");
const vm = require("vm");

const html = fs.readFileSync(process.argv[2], "utf8");
const data = html.match(/<script type="application\/json" id="view-data">([\s\S]*?)<\/script>/)[1];
const script = html.match(/<script>\n([\s\S]*?)<\/script>/)[1];

class Node {
  constructor(tag, text = "") {
    this.tag = tag;
    this.attrs = {};
    this.children = [];
    this.dataset = {};
    this.style = {};
    this.hidden = false;
    this.text = text;
    const classes = new Set();
    this.classList = { toggle: (name, on) => (on ? classes.add(name) : classes.delete(name)) };
  }
  setAttribute(key, value) {
    this.attrs[key] = String(value);
    if (key.startsWith("data-")) {
      this.dataset[key.slice(5).replace(/-(\w)/g, (_, c) => c.toUpperCase())] = String(value);
    }
  }
  append(...nodes) { this.children.push(...nodes.map(asNode)); }
  replaceChildren(...nodes) { this.children = nodes.map(asNode); }
  addEventListener() {}
  set textContent(text) { this.text = String(text); this.children = []; }
  get textContent() { return this.text + this.children.map((c) => c.textContent).join(""); }
}

// DOM methods take strings as text nodes
function asNode(node) { return typeof node === "string" ? new Node("#text", node) : node; }

const byId = { main: new Node("main"), tooltip: new Node("div"), subtitle: new Node("p") };
const document = {
  body: new Node("body"),
  createElement: (tag) => new Node(tag),
  createElementNS: (_, tag) => new Node(tag),
  createTextNode: (text) => new Node("#text", text),
  getElementById: (id) => (id === "view-data" ? { textContent: data } : byId[id]),
};
vm.runInNewContext(script, { document, console });

const maps = {};
const legends = [];
(function walk(node) {
  if (node.attrs["data-map"]) {
    maps[node.attrs["data-map"]] = node.children
      .filter((c) => c.attrs.class === "cell").map((c) => c.attrs.fill);
  }
  if (node.attrs.class === "scale-legend") {
    legends.push(node.children.filter((c) => c.tag === "text").map((c) => c.textContent));
  }
  node.children.forEach(walk);
})(byId.main);
console.log(JSON.stringify({ maps, legends }));
