// Swagger UI over this app's OpenAPI document (a static file: the CSP allows no inline script).
"use strict";

// For an array of binary parts (the upload field: one part per file) Swagger UI first asks for a
// component named after the items' type and format, "JsonSchema_string_binary", and warns in the
// console when there is none before it falls back to its file chooser. Name one: its own string
// input, which draws a file chooser for format binary.
const BinaryItems = (system) => ({
  components: {
    JsonSchema_string_binary: (props) => system.React.createElement(props.getComponent("JsonSchema_string"), props),
  },
});

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.specUrl,
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,  // the default would send the spec to validator.swagger.io
    presets: [SwaggerUIBundle.presets.apis],
    plugins: [BinaryItems],
  });
});
