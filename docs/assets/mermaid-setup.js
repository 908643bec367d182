// Two fixes to how Material for MkDocs draws mermaid 11 diagrams. Material renders each diagram
// into a CLOSED shadow root, so docs/assets/extra.css cannot reach inside; this file runs after the
// vendored mermaid.min.js and before Material's first diagram, and changes what Material asks for.
(function () {
  if (typeof window.mermaid === "undefined") return;

  // 1. Arrowheads. Material's theme colours `#arrowhead path`, the marker's name before mermaid 11;
  // mermaid 11 names its markers `<diagram id>-arrowhead` (and -crosshead, -filled-head,
  // solidTopArrowHead, ...) and paints them #333: invisible on the dark (slate) background. These
  // rules give every sequence-diagram marker the colour of the message lines, in both schemes.
  const markerCSS = [
    '[id$="-arrowhead"] path, [id$="-filled-head"] path,',
    '[id$="ArrowHead"] path, [id$="-sequencenumber"] circle',
    "{ fill: var(--md-mermaid-sequence-message-line-color) !important; }",
    '[id$="-arrowhead"] path, [id$="-crosshead"] path, [id$="ArrowHead"] path',
    "{ stroke: var(--md-mermaid-sequence-message-line-color) !important; }",
  ].join("\n");

  const initialize = window.mermaid.initialize.bind(window.mermaid);
  window.mermaid.initialize = function (config) {
    return initialize({ ...config, themeCSS: (config.themeCSS || "") + "\n" + markerCSS });
  };

  // 2. Phones. Mermaid sizes a diagram `width: 100%; max-width: <its natural width>`, so on a
  // 390 px screen a wide sequence diagram shrinks to 5 px text. A min-width of its natural width
  // (at most 40rem) keeps the text readable; the diagram's box scrolls sideways instead
  // (`.md-typeset .mermaid` in extra.css).
  const render = window.mermaid.render.bind(window.mermaid);
  window.mermaid.render = async function (...args) {
    const result = await render(...args);
    const svg = result.svg.replace(
      /style="max-width: ([\d.]+)px;/,
      (match, width) => `${match} min-width: min(${width}px, 40rem);`,
    );
    return { ...result, svg };
  };
})();
