// Swagger UI over this app's OpenAPI document (a static file: the CSP allows no inline script).
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.specUrl,
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,  // the default would send the spec to validator.swagger.io
    presets: [SwaggerUIBundle.presets.apis],
  });
});
