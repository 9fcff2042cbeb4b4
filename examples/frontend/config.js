// Where the authapp API lives. Edit this file when you deploy the page (a build step or
// your web server can write it); the page never takes the API's address from its URL,
// so a crafted link cannot send a user's password to another server.
window.AUTHAPP_CONFIG = {
  apiBaseUrl: "http://127.0.0.1:5000",
};
