// An agent step's conversation as it grows: each turn's text and the tool calls it asked (from `agent_turn` events),
// each call's result (from `tool_call` events), then the turn the model is writing now (its streamed text).
import { el } from "./common.js";

// The turns of `step` from the page's events, in order: {turn, text, calls: [{id, name, input, result?, error?}]}.
// A resumed run (`run_resumed`) starts the conversation over, as `resume` starts the loop afresh.
export function conversationOf(events, step) {
  let turns = [];
  const calls = new Map(); // tool_use id → its call in `turns`
  for (const event of events) {
    if (event.type === "run_resumed") {
      turns = [];
      calls.clear();
    }
    if (event.step !== step) continue;
    const data = event.data || {};
    if (event.type === "agent_turn") {
      const asked = (data.calls || []).map((call) => ({ id: call.id, name: call.name, input: call.input }));
      for (const call of asked) calls.set(call.id, call);
      turns.push({ turn: data.turn, text: data.text || "", calls: asked });
    } else if (event.type === "tool_call") {
      const call = calls.get(data.id);
      if (call) Object.assign(call, { result: data.result ?? "", error: Boolean(data.error) });
    }
  }
  return turns;
}

// Draws the conversation into `list` (an <ol>); `writing` is the text streamed since the last turn ended, or "".
export function renderConversation(list, turns, writing) {
  const items = turns.map((turn) =>
    el("li", { class: "turn", "data-turn": turn.turn },
      el("div", { class: "turn-head" }, `Turn ${turn.turn}`),
      turn.text ? el("p", { class: "turn-text" }, turn.text) : null,
      ...turn.calls.map((call) =>
        el("div", { class: `tool-call${call.error ? " has-error" : ""}`, "data-tool": call.name },
          el("code", {}, `${call.name} ${call.input ?? ""}`),
          el("div", { class: "tool-result" },
            call.result === undefined ? "running…" : `${call.error ? "✗" : "→"} ${call.result}`),
        ),
      ),
    ),
  );
  if (writing) {
    items.push(el("li", { class: "turn writing" }, el("div", { class: "turn-head" }, "Writing…"),
      el("p", { class: "turn-text" }, writing)));
  }
  list.replaceChildren(...items);
}
