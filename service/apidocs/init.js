// Starts Swagger UI on #swagger-ui with the document its data-url names. A file rather than an inline
// script, so the page's Content-Security-Policy can allow only this origin's scripts. validatorUrl:
// null keeps Swagger UI from asking a third-party validator for a badge.
"use strict";
window.addEventListener("DOMContentLoaded", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.url,
    domNode: root,
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    docExpansion: "list",
  });
});
